"""lmms-eval's entry point for the `gripbench` model (group `lmms_eval.models`).

A module of its own that imports nothing at load time: lmms-eval loads its entry points
while `lmms_eval.models` initialises, and `gripbench.lmms.model` imports from that package,
so pointing the entry point there made every start log "Failed to load model entry-point
manifests ... circular import". lmms-eval imports the model class itself only when asked.
"""


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="gripbench", simple_class_path="gripbench.lmms.model.GripbenchLMM")]
