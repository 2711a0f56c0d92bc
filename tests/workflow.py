"""A UI-format workflow (what the page saves and ComfyUI lists as a template) as the API prompt the page
would queue, checked against node definitions shaped as ``/object_info`` serves them."""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# the inputs that name a model file: a test machine has none of them (the lists are empty)
MODEL_FILES = ("ckpt_name", "model_name", "unet_name", "clip_name", "vae_name")


def api_prompt(workflow: dict, info: dict) -> dict:
    """The UI-format workflow as the API prompt the page would queue, checking it against /object_info."""
    links = {row[0]: row for row in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        assert node["type"] in info, f"node type {node['type']} is not registered"
        spec = info[node["type"]]
        inputs: dict = {}
        declared = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        values = list(node["widgets_values"])
        for name, (kind, *options) in declared.items():
            options = options[0] if options else {}
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                assert values, f"{node['type']}: no widget value for {name}"
                inputs[name] = values.pop(0)
                if isinstance(kind, list) and name != "image":
                    assert inputs[name] in kind or name in MODEL_FILES, f"{node['type']}.{name}={inputs[name]!r}"
                if options.get("control_after_generate") or (kind == "INT" and name in ("seed", "noise_seed")):
                    assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
                if options.get("image_upload"):
                    values.pop(0)
        assert not values, f"{node['type']}: widget values left over: {values}"
        for slot in node["inputs"]:
            if slot["link"] is None:
                continue
            _id, source, source_slot, target, target_slot, kind = links[slot["link"]]
            assert target == node["id"] and declared[slot["name"]][0] == kind == slot["type"]
            source_node = next(n for n in workflow["nodes"] if n["id"] == source)
            assert info[source_node["type"]]["output"][source_slot] == kind
            inputs[slot["name"]] = [str(source), source_slot]
        required = spec["input"].get("required", {})
        assert set(required) <= set(inputs), f"{node['type']}: unconnected required inputs {set(required) - set(inputs)}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def object_info(node_classes: dict) -> dict:
    """``/object_info``'s shape for node classes loaded in this process (``nodes.NODE_CLASS_MAPPINGS``)."""
    return {name: {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES)} for name, cls in node_classes.items()}
