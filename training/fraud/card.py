"""The model card (README.md) of a trained fraud model, filled in from its metrics."""

from __future__ import annotations

from training.export import PARITY_RULE
from training.fraud import simulate
from training.fraud.data import Dataset
from training.fraud.features import LABEL_DELAY_DAYS, Derived
from training.fraud.simulate import DAY

MODEL_NAMES = {
    "mlp": "MLP (shipped)",
    "logistic_regression": "Logistic regression",
    "lightgbm": "LightGBM",
}

CSV_STORY = """Trained on a file in the public credit-card fraud dataset format
(`Time, V1..V28, Amount, Class`): `V1..V28` are PCA components of confidential features, `Time`
is seconds from the first transaction. Rows are ordered by `Time` and cut at its 60 % and 80 %
quantiles."""


def render_card(metrics: dict, data: Dataset) -> str:
    """Markdown model card: inputs, outputs, training, measured quality, export and rebuild."""
    mlp, export, split = metrics["mlp"], metrics["export"], metrics["data"]["split"]
    threshold = mlp["threshold"]
    lines = [
        "# `fraud` - card-transaction fraud scoring",
        "",
        "A small PyTorch MLP exported to ONNX that turns one row of raw transaction columns into a",
        "calibrated fraud probability and a block/allow decision. Served by Volley from",
        "`models/fraud` (`config.yaml`, `1/model.onnx`); numbers below come from `metrics.json`.",
        "",
        "## Inputs",
        "",
        f"`features`: FP32 `[batch, {len(data.raw_names)}]`, one row of raw columns per",
        "transaction in the order below (`feature_names` in `config.yaml` and in the ONNX",
        "`metadata_props`). Send the values as they are: no logs, ratios or scaling on the client.",
        "",
        "| # | name | meaning and unit |",
        "|---|------|------------------|",
        *(f"| {i} | `{name}` | {doc} |" for i, (name, doc) in enumerate(data.raw_docs.items())),
        "",
        "### Computed in the graph",
        "",
        f"The graph computes the network's {len(data.feature_names)} features from the raw columns "
        "(in float32),",
        "log-compresses the marked heavy-tailed ones with log(1 + max(x, 0)) and standardises each",
        "with the training mean and std:",
        "",
        "| # | network feature | computed as | log-compressed |",
        "|---|-----------------|-------------|----------------|",
        *(
            f"| {i} | `{name}` | {_computed(data.recipe[name])} | "
            f"{'yes' if name in data.log_scaled else ''} |"
            for i, name in enumerate(data.feature_names)
        ),
        "",
        "Interface change: models exported before the derived features moved into the graph took",
        "the network's features directly, the client computing",
        f"{_derived_names(data)}.",
        "The input changed shape and meaning, so the shipped `models/fraud/1` was retrained in",
        "place rather than joined by a version 2.",
        "",
        "## Outputs",
        "",
        "| name | type | meaning |",
        "|------|------|---------|",
        "| `score` | FP32 `[batch, 1]` | calibrated probability that the transaction is fraud |",
        f"| `is_fraud` | BOOL `[batch, 1]` | `score >= {threshold}` |",
        "",
        f"The threshold {threshold} gives a {mlp['target_fpr']:.0%} false-positive rate on the",
        "validation window. It is stored in the ONNX `metadata_props` (`threshold`, `target_fpr`,",
        "`feature_names`) and in `config.yaml` `parameters`.",
        "",
        "## Training data",
        "",
        *_story(data),
        "",
        "| part | days | transactions | frauds | fraud rate |",
        "|------|------|--------------|--------|------------|",
        *(
            f"| {name} | {part['time_start'] / DAY:.1f} - {part['time_end'] / DAY:.1f} | "
            f"{part['rows']} | {part['frauds']} | {part['fraud_rate']:.3%} |"
            for name, part in split.items()
        ),
        "",
        "Train, validation and test are consecutive time windows (train < val < test), so the",
        "test numbers measure the model on a later period it never saw.",
        "",
        "## Training",
        "",
        f"- MLP {len(data.feature_names)} -> {' -> '.join(map(str, mlp['hidden']))} -> 1, ReLU,",
        f"  dropout {mlp['dropout']}, AdamW (lr {mlp['lr']}, batch {mlp['batch_size']}).",
        f"- Class imbalance: positive-class weight {mlp['pos_weight']:.1f} in the BCE loss",
        "  (square root of the negative/positive ratio), undone by the calibration step.",
        f"- Early stopping on validation average precision: best epoch {mlp['best_epoch']}",
        f"  of {len(mlp['history'])} run (patience {mlp['patience']}).",
        "- Calibration: Platt scaling, sigmoid(a * logit + b) with "
        f"a = {mlp['platt'][0]:.4f}, b = {mlp['platt'][1]:.4f},",
        "  fitted on the validation window and folded into the graph.",
        f"- Seeded ({metrics['run']['seed']}); torch runs single-threaded with deterministic",
        "  algorithms, so the same command reproduces the same metrics.",
        "",
        "## Quality on the held-out test window",
        "",
        f"Test window: {split['test']['rows']} transactions, base fraud rate "
        f"{split['test']['fraud_rate']:.3%} (the average precision of a random scorer).",
        "",
        "| model | average precision | ROC-AUC | recall @ 1 % FPR |",
        "|-------|-------------------|---------|------------------|",
        *(
            f"| {MODEL_NAMES[name]} | {m['average_precision']:.4f} | {m['roc_auc']:.4f} | "
            f"{m['recall_at_1pct_fpr']:.4f} |"
            for name, m in metrics["models"].items()
        ),
        "",
        *_comparison(metrics["models"]),
        "",
        f"At the shipped threshold the MLP flags {mlp['test_operating_point']['flagged']} test",
        f"transactions: FPR {mlp['test_operating_point']['fpr']:.3%}, recall "
        f"{mlp['test_operating_point']['recall']:.3f}, precision "
        f"{mlp['test_operating_point']['precision']:.3f}. Calibration on the test window: Brier",
        f"{mlp['test_calibration']['brier']:.5f}, expected calibration error "
        f"{mlp['test_calibration']['ece']:.5f}, mean score",
        f"{mlp['test_calibration']['mean_probability']:.4f} vs fraud rate "
        f"{mlp['test_calibration']['fraud_rate']:.4f}.",
        "",
        "Logistic regression (standardised, class-balanced) and LightGBM (early-stopped on",
        f"validation AP, {metrics['lightgbm']['trees']} trees) use the same features and split.",
        "",
        "## Export",
        "",
        f"ONNX opset {export['opset']}, dynamic batch dimension, validated by",
        "`onnx.checker.check_model(full_check=True)`. ONNX Runtime matches PyTorch on fresh random",
        f"inputs at batch sizes {export['parity_batch_sizes']}: largest relative difference",
        f"{export['parity_max_rel_diff']:.2e} ({PARITY_RULE}),",
        "identical decisions.",
        "",
        "## Rebuild",
        "",
        "```",
        metrics["run"]["command"],
        "```",
        "",
        "`volley train fraud` runs the same code (`training.fraud.main`); `--quick` trains a",
        "small version in well under a minute, `--data creditcard.csv` trains on the public",
        "dataset format instead of the simulator, `--out DIR` writes somewhere else.",
        "",
        "## Limitations",
        "",
        "- Trained on simulated data: the numbers show the pipeline works, not how it would do on",
        "  a real portfolio. Retrain on real, time-ordered data before relying on it.",
        "- Compromised-terminal fraud is only visible to the terminal risk features after the",
        f"  {LABEL_DELAY_DAYS}-day label delay, so its first days are largely missed.",
        "- The threshold targets 1 % FPR on the validation window; the realised FPR drifts with",
        "  the traffic mix (see the test operating point above).",
        "",
    ]
    return "\n".join(lines)


def _computed(how: str | Derived) -> str:
    """A recipe entry for the card: the raw column passed through, or the derivation."""
    return f"raw `{how}`" if isinstance(how, str) else how.formula()


def _derived_names(data: Dataset) -> str:
    """The derived network features, as `a`, `b` and `c`."""
    names = [f"`{n}`" for n, how in data.recipe.items() if isinstance(how, Derived)]
    if len(names) <= 1:
        return "".join(names) or "nothing"
    return f"{', '.join(names[:-1])} and {names[-1]}"


def _story(data: Dataset) -> list[str]:
    """The data-generating story: the simulator's docstring, or the CSV description."""
    if data.source.startswith("csv"):
        return [CSV_STORY, "", f"Source: `{data.source}`."]
    return [
        f"Simulated (`{data.source}`, `training/fraud/simulate.py`):",
        "",
        (simulate.__doc__ or "").strip(),
        "",
        "Features are computed point-in-time (`training/fraud/features.py`): rolling windows",
        "cover only strictly earlier transactions, and fraud labels enter the terminal risk",
        f"features only {LABEL_DELAY_DAYS} days after the fact, so a transaction's own label never",
        "feeds its features. The first days are a burn-in that fills the 30-day windows.",
    ]


def _comparison(models: dict) -> list[str]:
    """An honest sentence on how the MLP compares with each baseline on average precision."""
    mlp = models["mlp"]["average_precision"]
    lines = []
    for name in ("logistic_regression", "lightgbm"):
        diff = mlp - models[name]["average_precision"]
        verdict = "beats" if diff > 0.01 else "trails" if diff < -0.01 else "is on par with"
        lines.append(f"The MLP {verdict} {MODEL_NAMES[name]} on average precision ({diff:+.4f}).")
    return [" ".join(lines)]
