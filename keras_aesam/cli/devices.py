"""Which devices a run uses: the ``--strategy`` flags and the ``tf.distribute`` strategy they make.

Shared by ``keras-aesam train`` and ``keras-aesam bench``, so both offer the
same flags with the same meaning and the same error messages. The CPU split
and the multi-worker collectives can only be set up when TensorFlow's runtime
starts: ``strategy_for`` is called before anything else in the process runs a
TensorFlow operation.
"""

from __future__ import annotations

import argparse
import json
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


def _chief_rule(task_type, task_id, cluster) -> bool:
    """Keras's rule: the task ``chief``, else worker 0 of a cluster without one."""
    if task_type in (None, "chief"):
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


def is_chief(resolver) -> bool:
    """Whether the task of ``resolver`` writes the run's files (:func:`_chief_rule`)."""
    return _chief_rule(resolver.task_type, resolver.task_id, resolver.cluster_spec().as_dict())


def tf_config_is_chief() -> bool:
    """Whether this process is the chief of the cluster in ``TF_CONFIG``, read without starting TensorFlow.

    A bench's session decides this before its worker process joins the cluster
    (the cluster's port for this task is then free for that process).
    """
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise DeviceError("--strategy multi-worker reads the cluster from TF_CONFIG, which is not set")
    try:
        config = json.loads(text)
        task, cluster = config.get("task") or {}, config["cluster"]
        return _chief_rule(task.get("type"), int(task.get("index", 0)), cluster)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DeviceError("--strategy multi-worker: TF_CONFIG must be JSON with a \"cluster\" and this "
                          f"process's \"task\" (type and index), got {text!r} ({err})") from None


def cluster_agrees(strategy, text: str) -> bool:
    """Whether every worker of ``strategy``'s cluster passed the same ``text``; a collective: all must call it.

    A digest of ``text`` (8 bytes) and its squares are summed over the replicas:
    the sums equal replicas x this worker's values exactly (small integers in
    float32) for every worker if and only if all digests are equal (Cauchy-Schwarz),
    so a disagreement is seen by every worker alike, and none waits for the others.
    """
    import hashlib

    import numpy as np
    import tensorflow as tf

    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.uint8).astype("float32")
    local = np.concatenate([digest, digest ** 2])
    total = strategy.reduce("SUM", strategy.run(lambda: tf.constant(local)), axis=None)
    return bool(np.array_equal(np.asarray(total), strategy.num_replicas_in_sync * local))


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


def describe(strategy) -> str:
    """One line on the devices a run uses: ``devices: CPU only (no GPU found); one device, 1 replica``.

    A machine without a GPU is no error: this line is where a run says so (the
    quiet start-up hides TensorFlow's "failed call to cuInit" for it).
    """
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    cpus = tf.config.list_logical_devices("CPU")
    if gpus:
        used = f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''} ({', '.join(d.name for d in gpus)})"
    elif len(cpus) > 1:
        used = f"CPU only (no GPU found), split into {len(cpus)} logical devices"
    else:
        used = "CPU only (no GPU found)"
    replicas = strategy.num_replicas_in_sync
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        how = "MultiWorkerMirroredStrategy across the workers of TF_CONFIG"
    elif isinstance(strategy, tf.distribute.MirroredStrategy):
        how = "MirroredStrategy"
    else:
        how = "one device"
    return f"devices: {used}; {how}, {replicas} replica{'s' if replicas > 1 else ''}"


def replicas_text(replicas: int, global_batch: int) -> str:
    """``"2 replicas x 32"``: how a global batch is split, for start-up and progress lines."""
    return f"{replicas} replica{'s' if replicas > 1 else ''} x {global_batch // replicas}"
