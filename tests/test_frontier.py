"""Which method: a row qualifies at <= 1.25 passes when within SAM's CI or keeping 90 % of SAM's gain."""

import csv
import json
import math

import pytest

from keras_aesam.bench import frontier


def _row(acc, passes, std=0.0, n=5, degenerate=0, label="x"):
    return {"n": n, "acc_mean": acc, "acc_std": std, "evals_ratio": passes, "degenerate": degenerate,
            "label": label, "vs_sam": None}


def _setting(**rows):
    base = {"erm": _row(0.70, 1.0), "sam": _row(0.80, 2.0, std=0.005)}
    return {**base, **rows}


def test_sams_interval_is_the_student_t_interval_of_its_mean():
    low, high = frontier.sam_interval(0.80, 0.01, 5)
    half = 2.7764451051977987 * 0.01 / math.sqrt(5)  # t(0.975, 4)
    assert low == pytest.approx(0.80 - half) and high == pytest.approx(0.80 + half)


def test_a_row_qualifies_by_the_interval_or_by_the_share_of_the_gain():
    half = 2.7764451051977987 * 0.005 / math.sqrt(5)  # 0.0062
    verdicts = frontier.judge(_setting(
        inside=_row(0.80 - 0.9 * half, 1.1),        # within SAM's interval
        gain=_row(0.791, 1.2),                      # below the interval (0.8 - 0.0062), 91 % of the gain
        short=_row(0.70 + 0.85 * 0.10, 1.0),        # 85 % of the gain, below the interval
        costly=_row(0.81, 1.3),                     # better than SAM, but over 1.25 passes
        collapsed=_row(0.80, 1.1, degenerate=1),    # a collapsed seed is not a result
    ))
    assert verdicts["inside"]["within_ci"] and verdicts["inside"]["qualifies"]
    assert not verdicts["gain"]["within_ci"] and verdicts["gain"]["keeps_gain"] and verdicts["gain"]["qualifies"]
    assert not verdicts["short"]["qualifies"]
    assert not verdicts["costly"]["qualifies"] and not verdicts["costly"]["cheap"]
    assert not verdicts["collapsed"]["qualifies"]
    assert verdicts["gain"]["gain_share"] == pytest.approx(0.91)


def test_the_answer_qualifies_in_every_setting_and_has_the_most_accuracy_per_evaluation():
    settings = {
        ("mlp", "noise0"): _setting(a=_row(0.80, 1.0), b=_row(0.80, 1.2), c=_row(0.80, 1.1)),
        ("cnn", "noise40"): _setting(a=_row(0.75, 1.0), b=_row(0.80, 1.2), c=_row(0.80, 1.1)),
    }
    ranking, _ = frontier.frontier(settings)
    assert [r["key"] for r in ranking[:2]] == ["c", "b"]  # a fails the CNN setting; c is cheaper than b
    assert ranking[0]["qualifies_everywhere"] and not [r for r in ranking if r["key"] == "a"][0][
        "qualifies_everywhere"]
    assert ranking[0]["acc_per_eval"] == pytest.approx(0.80 / 1.1)


def test_a_row_missing_from_a_setting_is_not_ranked():
    settings = {("mlp", "noise0"): _setting(a=_row(0.80, 1.0)), ("cnn", "noise40"): _setting()}
    ranking, _ = frontier.frontier(settings)
    assert "a" not in {r["key"] for r in ranking}


def test_rho_rows_are_the_chosen_ones(tmp_path):
    (tmp_path / "profile.json").write_text(json.dumps({"regime": "cnn"}))
    (tmp_path / "rho_noise40.json").write_text(json.dumps({"rho": 0.1}))
    (tmp_path / "msam_rho_noise40.json").write_text(json.dumps({"rho": 2.0}))
    columns = ["setting", "label", "n", "acc_mean", "acc_std", "evals_ratio", "degenerate"]
    with open(tmp_path / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for label, acc, passes in (("erm", 0.7, 1), ("sam_rho0.1", 0.8, 2), ("sam_rho0.05", 0.9, 2),
                                   ("msam_rho2", 0.78, 1), ("msam_rho1", 0.79, 1)):
            writer.writerow({"setting": "noise40", "label": label, "n": 5, "acc_mean": acc, "acc_std": 0.01,
                             "evals_ratio": passes, "degenerate": 0})
    rows = frontier.load_settings([tmp_path])[("cnn", "noise40")]
    assert set(rows) == {"erm", "sam", "msam"}
    assert rows["sam"]["label"] == "sam_rho0.1" and rows["msam"]["label"] == "msam_rho2"


def test_the_command_refuses_a_folder_without_a_report(tmp_path, capsys):
    with pytest.raises(SystemExit):
        frontier.main([str(tmp_path), "--output", str(tmp_path / "f.md")])
    assert "summary.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        frontier.main([str(tmp_path), "--output", "f.md", "--max-passes", "3"])
    assert "--max-passes must be in [1, 2]" in capsys.readouterr().err
