"""Which devices a run uses: the ``--strategy`` flags and the ``tf.distribute`` strategy they make.

Shared by ``keras-aesam train`` and ``keras-aesam bench``, so both offer the
same flags with the same meaning and the same error messages. The CPU split
and the multi-worker collectives can only be set up when TensorFlow's runtime
starts: ``strategy_for`` is called before anything else in the process runs a
TensorFlow operation.
"""

from __future__ import annotations

import argparse
import os

#: Values of ``--strategy``.
STRATEGIES = ("auto", "one", "mirrored", "multi-worker")


class DeviceError(ValueError):
    """A device flag that cannot be honoured; the message names the flag and what it accepts."""


def add_strategy_flags(parser) -> None:
    """Adds ``--strategy``, ``--cpu-devices`` and ``--sync-perturbation`` to ``parser`` (or an argument group)."""
    parser.add_argument("--strategy", choices=STRATEGIES, default="auto",
                        help="auto (default): mirrored when more than one GPU (or --cpu-devices > 1) is "
                        "visible, else one; one: a single device; mirrored: every local GPU, else the "
                        "--cpu-devices; multi-worker: the cluster in TF_CONFIG")
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="split the CPU into N logical devices, to try and test distribution without GPUs")
    parser.add_argument("--sync-perturbation", action=argparse.BooleanOptionalAction, default=True,
                        help="perturb with the all-reduced gradient, as one device on the global batch "
                        "(default on; off: each replica perturbs with its own shard's gradient)")


def check_flags(strategy: str, cpu_devices: int | None) -> None:
    """DeviceError unless ``--strategy`` and ``--cpu-devices`` go together (no TensorFlow involved)."""
    if strategy not in STRATEGIES:
        raise DeviceError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if cpu_devices is not None and cpu_devices < 1:
        raise DeviceError(f"--cpu-devices must be >= 1, got {cpu_devices}")
    if cpu_devices is not None and strategy == "multi-worker":
        raise DeviceError("--cpu-devices is for --strategy mirrored, one or auto (a worker uses its GPUs or its CPU)")


def split_cpu(count: int) -> None:
    """Splits the CPU into ``count`` logical devices (before TensorFlow's runtime starts), else DeviceError.

    Called again in a process already split the same way, it does nothing.
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:  # TensorFlow already started in this process: fine if it has the same split
        have = len(tf.config.list_logical_devices("CPU"))
        if have != count:
            raise DeviceError(f"--cpu-devices {count}: TensorFlow already started in this process "
                              f"with {have} CPU device(s); pass it to a fresh process") from None


def is_chief(resolver) -> bool:
    """Keras's rule: the task ``chief``, else worker 0 of a cluster without one."""
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


def strategy_for(name: str, cpu_devices: int | None = None):
    """``(strategy, is_chief)``: the ``tf.distribute`` strategy ``--strategy name`` asks for, and whether
    this process writes the run's files; DeviceError for flags it cannot honour.
    """
    import tensorflow as tf

    check_flags(name, cpu_devices)
    if cpu_devices:
        split_cpu(cpu_devices)
    if name == "multi-worker":
        if not os.environ.get("TF_CONFIG"):
            raise DeviceError("--strategy multi-worker reads the cluster from TF_CONFIG, which is not set")
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except (ValueError, RuntimeError) as err:
            raise DeviceError(f"--strategy multi-worker: {' '.join(str(err).split())}") from err
        return strategy, is_chief(strategy.cluster_resolver)
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    devices = gpus or [d.name for d in tf.config.list_logical_devices("CPU")]
    if name == "mirrored" or (name == "auto" and len(devices) > 1):
        return tf.distribute.MirroredStrategy(devices), True
    return tf.distribute.get_strategy(), True


def replicas_text(replicas: int, global_batch: int) -> str:
    """``"2 replicas x 32"``: how a global batch is split, for start-up and progress lines."""
    return f"{replicas} replica{'s' if replicas > 1 else ''} x {global_batch // replicas}"
