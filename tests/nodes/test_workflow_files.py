"""The shipped workflows, checked as files (no server, no ComfyUI import).

UI workflows (workflows/*.json, what users drag into the frontend): links point at existing nodes and slots and
agree with both ends, node ids are unique, node types are ComfyUI core nodes used here or this pack's node ids,
and widgets_values line up with each node's widgets. API twins (workflows/api/*.json, what POST /prompt takes)
must use the same values and links as their UI workflow.

Widget names of the pack's nodes are read from nodes/*.py with a light `ast` parse of the `io.Schema(...)` calls
(so a changed schema shows up here); those of the few core nodes the workflows use are hard-coded from
GET /object_info of ComfyUI 0.3.75 with frontend 1.32.9 (the frontend adds LoadImage's `upload` widget and a
`control_after_generate` value after each seed that asks for it).
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.nodes.comfy_server import REFERENCE_IMAGE, REPO_ROOT, WORKFLOW_MODEL_NAME, WORKFLOW_REWARDS

WORKFLOWS = REPO_ROOT / "workflows"
UI_WORKFLOWS = ["personalized_generation", "best_of_n", "grounding_to_text_encoder"]
API_TWINS = {  # API file -> its UI workflow
    "personalized_generation": "personalized_generation",
    "best_of_n": "best_of_n",
    "grounding_only": "grounding_to_text_encoder",
}
CONTROL = "control_after_generate"
WIDGET_KINDS = {"Combo", "String", "Int", "Float", "Boolean"}

# Core nodes: widget names in widgets_values order (from /object_info's input_order plus the frontend's extras).
CORE_WIDGETS = {
    "Note": ["text"],
    "LoadImage": ["image", "upload"],
    "SaveImage": ["filename_prefix"],
    "PreviewImage": [],
    "PreviewAny": [],
    "CheckpointLoaderSimple": ["ckpt_name"],
    "CLIPTextEncode": ["text"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "KSampler": ["seed", CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "VAEDecode": [],
}
FRONTEND_ONLY = {"Note"}  # virtual nodes: never sent to the server, no API counterpart
TOP_LEVEL_KEYS = {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"}


# --- the pack's schemas, parsed from nodes/*.py -------------------------------------------------------------


@dataclass
class Schema:
    node_id: str
    widgets: list[str] = field(default_factory=list)  # widgets_values order, control_after_generate included
    sockets: list[str] = field(default_factory=list)  # link-only inputs, required then optional
    required_sockets: list[str] = field(default_factory=list)
    combos: dict[str, list] = field(default_factory=dict)  # combo widgets with literal options
    outputs: int = 0


def _keyword(call: ast.Call, name: str, default=None):
    for keyword in call.keywords:
        if keyword.arg == name:
            try:
                return ast.literal_eval(keyword.value)
            except ValueError:
                return keyword.value
    return default


def _input_kind(call: ast.Call) -> str | None:
    """`io.Int.Input(...)` -> "Int"; `MMR1Model.Input(...)` (a custom socket type) -> None."""
    owner = call.func.value if isinstance(call.func, ast.Attribute) else None
    if isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name) and owner.value.id == "io":
        return owner.attr
    return None


def parse_pack_schemas(folder: Path = REPO_ROOT / "nodes") -> dict[str, Schema]:
    schemas: dict[str, Schema] = {}
    for path in sorted(folder.glob("*.py")):
        for call in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "Schema"):
                continue
            schema = Schema(_keyword(call, "node_id"))
            inputs = _keyword(call, "inputs", [])
            inputs = inputs.elts if isinstance(inputs, ast.List) else []
            ordered = [item for item in inputs if not _keyword(item, "optional", False)]
            ordered += [item for item in inputs if _keyword(item, "optional", False)]  # V3 input_order
            widgets, sockets = [], []
            for item in ordered:
                name, kind = ast.literal_eval(item.args[0]), _input_kind(item)
                if kind in WIDGET_KINDS and not _keyword(item, "force_input", False):
                    widgets.append(name)
                    if _keyword(item, CONTROL, False):
                        widgets.append(CONTROL)
                    options = _keyword(item, "options")
                    if kind == "Combo" and isinstance(options, list):
                        schema.combos[name] = options
                else:
                    sockets.append(name)
                    if not _keyword(item, "optional", False):
                        schema.required_sockets.append(name)
            schema.widgets, schema.sockets = widgets, sockets
            outputs = _keyword(call, "outputs", [])
            schema.outputs = len(outputs.elts) if isinstance(outputs, ast.List) else 0
            schemas[schema.node_id] = schema
    return schemas


PACK = parse_pack_schemas()


def widget_names(node_type: str) -> list[str]:
    """The names behind a node's widgets_values, in order."""
    return PACK[node_type].widgets if node_type in PACK else CORE_WIDGETS[node_type]


def load_ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def load_api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def named_widgets(node: dict) -> dict:
    return dict(zip(widget_names(node["type"]), node["widgets_values"]))


# --- tests --------------------------------------------------------------------------------------------------


def test_the_parse_finds_every_pack_node():
    assert set(PACK) == {
        "MMR1LoadModel", "MMR1SubjectGrounding", "MMR1PersonalizedGenerate", "MMR1LoadReward", "MMR1RewardScore"
    }
    # Spot checks against GET /object_info of a running server (input_order and control_after_generate).
    assert PACK["MMR1LoadModel"].widgets == ["model", "dtype", "attention", "offload", "compile", "quantization"]
    assert PACK["MMR1SubjectGrounding"].widgets == [
        "prompt", "max_new_tokens", "temperature", "seed", CONTROL, "subject_tokens"
    ]
    assert PACK["MMR1PersonalizedGenerate"].sockets == ["mmr1_model", "subject", "reasoning", "subject_image"]
    assert PACK["MMR1SubjectGrounding"].outputs == 4  # subject, reasoning, rewritten_prompt, subject_image (appended)
    assert PACK["MMR1RewardScore"].widgets == ["prompt", "top_k"]
    assert PACK["MMR1RewardScore"].outputs == 4


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_ui_workflow_structure(name):
    workflow = load_ui(name)
    assert TOP_LEVEL_KEYS <= set(workflow), TOP_LEVEL_KEYS - set(workflow)
    assert workflow["version"] == 0.4
    nodes = workflow["nodes"]
    ids = [node["id"] for node in nodes]
    assert len(ids) == len(set(ids)), f"duplicate node ids in {name}"
    assert workflow["last_node_id"] >= max(ids)
    link_ids = [link[0] for link in workflow["links"]]
    assert len(link_ids) == len(set(link_ids)), f"duplicate link ids in {name}"
    assert workflow["last_link_id"] >= max(link_ids, default=0)

    for node in nodes:
        kind = node["type"]
        assert kind in PACK or kind in CORE_WIDGETS, f"node {node['id']}: {kind} is neither core nor this pack's"
        for key in ("pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties", "widgets_values"):
            assert key in node, f"node {node['id']} ({kind}) has no {key}"
        if kind not in FRONTEND_ONLY:
            assert node["properties"].get("Node name for S&R") == kind


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_ui_workflow_links(name):
    workflow = load_ui(name)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    for link_id, from_node, from_slot, to_node, to_slot, link_type in workflow["links"]:
        assert from_node in nodes and to_node in nodes, f"link {link_id} joins a missing node"
        outputs, inputs = nodes[from_node]["outputs"], nodes[to_node]["inputs"]
        assert 0 <= from_slot < len(outputs), f"link {link_id}: node {from_node} has no output {from_slot}"
        assert 0 <= to_slot < len(inputs), f"link {link_id}: node {to_node} has no input {to_slot}"
        output, target = outputs[from_slot], inputs[to_slot]
        assert link_id in (output["links"] or []), f"link {link_id} not listed on its output"
        assert target["link"] == link_id, f"link {link_id} not set on input {target['name']} of node {to_node}"
        assert target["type"] in ("*", output["type"]), f"link {link_id}: {output['type']} into {target['type']}"
        assert link_type in (output["type"], target["type"])
    # ...and every reference from a node points back at a link that says so.
    for node in nodes.values():
        for slot, target in enumerate(node["inputs"]):
            if target["link"] is not None:
                assert links[target["link"]][3:5] == [node["id"], slot], f"node {node['id']} input {target['name']}"
        for slot, output in enumerate(node["outputs"]):
            assert output.get("slot_index", slot) == slot
            for link_id in output["links"] or []:
                assert links[link_id][1:3] == [node["id"], slot], f"node {node['id']} output {output['name']}"


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_ui_workflow_widgets(name):
    for node in load_ui(name)["nodes"]:
        kind, values = node["type"], node["widgets_values"]
        names = widget_names(kind)
        assert len(values) == len(names), f"node {node['id']} ({kind}): {len(values)} values for widgets {names}"
        # The frontend stores each widget as an input too (link set when converted); same names, same order.
        widget_inputs = [target["name"] for target in node["inputs"] if "widget" in target]
        if kind not in FRONTEND_ONLY:
            assert widget_inputs == [widget for widget in names if widget != CONTROL], f"node {node['id']}"
        named = dict(zip(names, values))
        if CONTROL in named:
            assert named[CONTROL] in ("fixed", "increment", "decrement", "randomize")
            assert named[CONTROL] == "fixed", f"node {node['id']}: shipped workflows keep their seeds"
        if kind in PACK:
            schema = PACK[kind]
            sockets = [target["name"] for target in node["inputs"] if "widget" not in target]
            assert sockets == schema.sockets, f"node {node['id']} ({kind})"
            assert len(node["outputs"]) == schema.outputs
            for socket in schema.required_sockets:
                assert next(t for t in node["inputs"] if t["name"] == socket)["link"] is not None, (
                    f"node {node['id']} ({kind}): required input {socket} is not connected"
                )
            for widget, options in schema.combos.items():
                assert named[widget] in options, f"node {node['id']}: {widget}={named[widget]!r} not in {options}"
    nodes = load_ui(name)["nodes"]
    models = {named_widgets(n)["model"] for n in nodes if n["type"] == "MMR1LoadModel"}
    rewards = {(named_widgets(n)["model"], named_widgets(n)["metric"]) for n in nodes if n["type"] == "MMR1LoadReward"}
    images = {named_widgets(n)["image"] for n in nodes if n["type"] == "LoadImage"}
    assert models == {WORKFLOW_MODEL_NAME}  # the embedded model: the workflows run out of the box
    assert rewards <= WORKFLOW_REWARDS
    assert images == {REFERENCE_IMAGE}


@pytest.mark.parametrize("api_name, ui_name", sorted(API_TWINS.items()))
def test_api_twin_matches_its_ui_workflow(api_name, ui_name):
    api, ui = load_api(api_name), load_ui(ui_name)
    nodes = {str(node["id"]): node for node in ui["nodes"]}
    ui_links = {(link[3], link[4]): (link[1], link[2]) for link in ui["links"]}
    assert {entry["class_type"] for entry in api.values()} & set(PACK), "an API twin without pack nodes"
    for node_id, entry in api.items():
        assert node_id in nodes, f"API node {node_id} has no UI node of the same id in {ui_name}"
        node = nodes[node_id]
        assert entry["class_type"] == node["type"], f"node {node_id}"
        widgets = named_widgets(node)
        inputs = {target["name"]: slot for slot, target in enumerate(node["inputs"])}
        for input_name, value in entry["inputs"].items():
            if isinstance(value, list):  # a link: the UI has the same one
                assert input_name in inputs, f"node {node_id} has no input {input_name}"
                assert ui_links.get((node["id"], inputs[input_name])) == (int(value[0]), value[1]), (
                    f"node {node_id}.{input_name}: API links {value}, the UI workflow does not"
                )
            else:
                assert input_name in widgets, f"node {node_id}: {input_name} is not a widget of {node['type']}"
                assert value == widgets[input_name], f"node {node_id}.{input_name}: API {value!r}, UI {widgets[input_name]!r}"
        # Every widget of the pack's nodes is given (API prompts have no defaults to fall back on).
        if node["type"] in PACK:
            assert set(widgets) - {CONTROL} == {k for k, v in entry["inputs"].items() if not isinstance(v, list)}
        # UI links into this node whose source is part of the twin are in the twin too.
        for (to_node, to_slot), (from_node, from_slot) in ui_links.items():
            if to_node == node["id"] and str(from_node) in api:
                name = node["inputs"][to_slot]["name"]
                assert entry["inputs"].get(name) == [str(from_node), from_slot], f"node {node_id}.{name} missing"
