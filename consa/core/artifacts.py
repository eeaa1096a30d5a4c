"""Every file a run publishes, declared once: its name, media type, the recipe step that writes it,
and how the dashboard shows it. consa.recipe.pipeline writes them under these names, the service
serves them with these media types and tells the dashboard which to show; a new artifact is one
entry here plus the code that writes it."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Artifact:
    name: str
    media_type: str
    written_by: str  # the step of consa.recipe.pipeline: search, heatmap, evaluation or export
    shown_as: str | None  # the dashboard's view of it: "image", "table" (an evaluation), or None
    help: str


MANIFEST = Artifact("manifest.json", "application/json", "search", None,
                    "the allocation: which units keep full attention (consa.core.manifest)")
GATES = Artifact("gates.safetensors", "application/octet-stream", "search", None,
                 "the gate logits and the search's state (`consa search --resume` continues from it)")
HEATMAP = Artifact("heatmap.png", "image/png", "heatmap", "image", "FA/SWA per layer and KV head")
EVALUATION_TABLE = Artifact("evaluation.md", "text/markdown", "evaluation", "table",
                            "the evaluation as a table: full attention, the allocation and every baseline")
EVALUATION = Artifact("evaluation.json", "application/json", "evaluation", None,
                      "the evaluation's records: loss, retrieval and KV bytes per method")
HISTORY = Artifact("history.json", "application/json", "search", None,
                   "the search's record per step: loss, expected sparsity, target, multipliers")
CHECKPOINT = Artifact("checkpoint.tar", "application/x-tar", "export", None,
                      "the hybrid model, a transformers checkpoint directory packed as one file")

ARTIFACTS = {a.name: a for a in (MANIFEST, GATES, HISTORY, HEATMAP, EVALUATION_TABLE, EVALUATION, CHECKPOINT)}
