"""The headline tables: a verdict against the reference's fixed number and against the 85% bar
for synthetic data follows the interval, never the point estimate."""

from brainhpc.sweep.headline import against, headline


def _est(ds, stage, model, arm, train, metric, value, lo, hi):
    return {"dataset": ds, "stage": stage, "model": model, "arm": arm, "train_data": train,
            "metric": metric, "value": value, "lo": lo, "hi": hi}


def test_a_verdict_against_a_fixed_number_needs_the_whole_interval():
    assert against(0.9667, 0.76, 0.86) == "worse"
    assert against(0.5816, 0.60, 0.70) == "better"
    assert against(0.85, 0.78, 0.94) == "not resolved"  # point 0.86 above the bar: not enough
    assert against(None, 0.1, 0.2) == "-" and against(0.5, None, None) == "-"


def test_the_headline_puts_reference_intervals_and_verdicts_side_by_side():
    rows = [{"dataset": "br35h", "technique": "", "train_data": "synthetic:ldm",
             "ref_accuracy": 0.5816, "ref_f1": 0.5724}]
    ivals = [_est("br35h", "classify", "cnn", "cnn", "synthetic:ldm", "balanced_accuracy",
                  0.678, 0.594, 0.749),
             _est("br35h", "classify", "baseline", "image statistics", "real",
                  "balanced_accuracy", 0.803, 0.75, 0.85),
             _est("lgg", "segment", "unet", "unet", "real", "dice_patient", 0.675, 0.58, 0.77),
             _est("lgg", "segment", "unet", "unet", "synthetic:vae", "dice_patient", 0.582,
                  0.466, 0.684),
             _est("br35h on lgg", "classify", "cnn", "cnn", "real", "balanced_accuracy", 0.55,
                  0.52, 0.57)]
    comps = [{**_est("br35h", "classify", "cnn", "cnn", "synthetic:ldm", "balanced_accuracy",
                     -0.125, -0.237, -0.013), "versus": "image statistics",
              "kind": "difference", "verdict": "worse"},
             {**_est("lgg", "segment", "unet", "unet", "synthetic:vae", "dice_patient", 0.86,
                     0.78, 0.94), "versus": "real", "kind": "ratio", "verdict": "worse"}]
    text = headline(rows, ivals, comps)
    line = next(x for x in text.splitlines() if x.startswith("| CNN | synthetic:ldm"))
    # the reference's 58.16 lies below our interval [59.4, 74.9]: better than the reference,
    # and worse than image statistics by 12.5 points
    assert "58.16 (57.24)" in line and "67.8 [59.4, 74.9]" in line
    assert "| better |" in line and "worse (-12.5 [-23.7, -1.3])" in line
    seg = next(x for x in text.splitlines() if x.startswith("| U-Net | synthetic:vae"))
    assert "86 [78, 94]" in seg and "not resolved" in seg
    assert "br35h on lgg" not in text  # external sets stay in the interval section
    assert headline(rows, [], []) == ""
