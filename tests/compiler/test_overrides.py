"""Overrides name things that exist: ``--set``, an extends file's ``set:`` and its ``params:``.

A path must be a key of the merged document or a key its schema documents (``train.warmup``
in a blueprint without ``train:``, a component parameter with a default); anything else is an
error with the closest names and the place the override was written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from physlm_graph import ResolveError, compile_blueprint
from physlm_graph._load import load_document
from physlm_graph._merge import apply_overrides, merge_extends
from physlm_graph._schema import TrainConfig
from physlm_graph.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "assets" / "blueprints" / "valid" / "tiny.yaml"
SHIPPED = sorted((ROOT / "blueprints").rglob("*.yaml")) + sorted((ROOT / "examples").rglob("*.yaml"))
NO_TRAIN = [p for p in SHIPPED if "study:" not in p.read_text() and "train" not in merge_extends(load_document(p)).data]


def _error(overrides, source=TINY) -> str:
    with pytest.raises(ResolveError) as info:
        compile_blueprint(source, overrides=overrides, device="meta", build=False)
    return str(info.value)


# ------------------------------------------------------------------ --set


def test_a_param_typo_on_the_command_line_is_refused_with_did_you_mean():
    assert _error(["params.layerz=2"]) == (
        "resolve error: <command line>: --set params.layerz=2: params has no key 'layerz', and no ${...} uses it\n"
        "  fix: did you mean params.layers?")
    # the dict form of compile_blueprint says the same, written as one would type it
    assert _error({"params.layerz": 2}) == _error(["params.layerz=2"])


def test_a_bare_name_that_is_no_param_suggests_the_param():
    assert _error(["layerz=2"]) == (
        "resolve error: <command line>: --set layerz=2: the top level has no key 'layerz'\n"
        "  fix: did you mean params.layers?")


def test_train_options_can_be_set_on_a_blueprint_without_train():
    assert "train" not in load_document(TINY).data
    cm = compile_blueprint(TINY, overrides=["train.warmup=5", "train.lr=3e-4"], device="meta", build=False)
    assert cm.train_config.warmup == 5 and cm.train_config.lr == 3e-4
    assert _error(["train.warmpu=5"]) == (
        "resolve error: <command line>: --set train.warmpu=5: train has no key 'warmpu'\n"
        "  fix: did you mean train.warmup?")


@pytest.mark.parametrize("path", NO_TRAIN, ids=[p.stem for p in NO_TRAIN])
def test_every_shipped_blueprint_without_train_takes_train_warmup(path):
    doc = apply_overrides(merge_extends(load_document(path)), ["train.warmup=5"])
    assert TrainConfig.model_validate(doc.data["train"]).warmup == 5


def test_shipped_blueprints_without_train_exist():
    assert len(NO_TRAIN) >= 2  # llama-style and llama2-7b


def test_optional_keys_of_sections_and_components_are_accepted():
    cm = compile_blueprint(TINY, overrides=["init.std=0.01", "nodes.head.bias=true", "exits.every=1",
                                            "exits.block=trunk"], device="meta", build=False)
    assert cm.resolved.spec.init.std == 0.01
    assert cm.checked["head"].bias is True
    assert cm.resolved.exit_points == ["trunk.0"]
    assert _error(["init.sdt=0.01"]).endswith("init has no key 'sdt'\n  fix: did you mean init.std?")
    assert _error(["nodes.head.biaz=true"]) == (
        "resolve error: <command line>: --set nodes.head.biaz=true: nodes.head (head.lm) has no key 'biaz'\n"
        "  fix: did you mean nodes.head.bias?")


def test_nested_paths_into_blocks_nodes_and_lists_keep_working():
    cm = compile_blueprint(TINY, overrides=["blocks.block.nodes.attn.num_heads=2", "nodes.x0.in.0=pos", "nodes.x0.in.1=tok",
                                            "blocks.block.nodes.mlp.hidden_dim=${2 * dim}"],
                           device="meta", build=False)
    assert cm.checked["trunk.1.attn"].num_heads == 2
    assert cm.checked["trunk.0.mlp"].hidden_dim == 64
    assert [str(r) for _, r in cm.resolved.nodes["x0"].inputs] == ["pos", "tok"]
    assert _error(["blocks.block.nodes.attn.num_headz=2"]) == (
        "resolve error: <command line>: --set blocks.block.nodes.attn.num_headz=2: blocks.block.nodes.attn "
        "(attention.causal) has no key 'num_headz'\n"
        "  fix: did you mean blocks.block.nodes.attn.num_heads, blocks.block.nodes.attn.num_kv_heads?")
    assert _error(["nodes.x0.in.5=tok"]) == (
        "resolve error: <command line>: --set nodes.x0.in.5=tok: nodes.x0.in has no item 5\n  fix: items 0..1")
    assert _error(["params.layers.x=1"]) == (
        "resolve error: <command line>: --set params.layers.x=1: params.layers is 2, not a mapping, so it has no 'x'")


def test_a_block_node_takes_its_block_params():
    text = TINY.read_text().replace("    out: r2\n", "    out: r2\n    params: {width: 4}\n").replace(
        'hidden_dim: "${4 * dim}"', 'hidden_dim: "${width * dim}"')
    cm = compile_blueprint(text, overrides=["nodes.trunk.width=2"], device="meta", build=False)
    assert cm.checked["trunk.0.mlp"].hidden_dim == 64
    assert _error(["nodes.trunk.widht=2"], text).endswith(
        "nodes.trunk (block block) has no key 'widht'\n  fix: did you mean nodes.trunk.width?")


def test_a_section_that_is_a_list_is_not_created():
    assert _error(["growth.0.until=3"]) == (
        "resolve error: <command line>: --set growth.0.until=3: this blueprint has no growth, so growth.0.until "
        "cannot be set in it\n  fix: write `growth:` into the blueprint first")


def test_new_names_in_open_mappings_and_used_params_are_accepted():
    cm = compile_blueprint(TINY, overrides={"params.mult": 2, "blocks.block.nodes.mlp.hidden_dim": "${mult * dim}",
                                            "outputs.hidden": "norm"}, device="meta", build=False)
    assert cm.checked["trunk.0.mlp"].hidden_dim == 64
    assert set(cm.resolved.outputs) == {"logits", "hidden"}


def test_the_cli_names_the_override(capsys):
    assert main(["validate", str(TINY), "--set", "params.layerz=2"]) == 2
    assert capsys.readouterr().err == (
        "resolve error: <command line>: --set params.layerz=2: params has no key 'layerz', and no ${...} uses it\n"
        "  fix: did you mean params.layers?\n")


# ------------------------------------------------------------------ extends files


def _derived(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "derived.yaml"
    path.write_text(f"physlm: 1\nextends: {TINY}\nname: derived\n{body}")
    return path


def test_a_typo_in_set_of_an_extends_file_is_located(tmp_path):
    path = _derived(tmp_path, "set:\n  params.layers: 3\n  params.layerz: 4\n")
    assert _error(None, path) == (
        f"resolve error: {path}:6:3: cannot set params.layerz: params has no key 'layerz', and no ${{...}} uses it\n"
        "  fix: did you mean params.layers?")


def test_a_typo_in_params_of_an_extends_file_is_located(tmp_path):
    path = _derived(tmp_path, "params: {dim: 64, layerz: 4}\n")
    assert _error(None, path) == (
        f"resolve error: {path}:4:19: params.layerz: params has no key 'layerz', and no ${{...}} uses it\n"
        "  fix: did you mean params.layers?")


def test_an_extends_file_may_add_a_param_that_something_uses(tmp_path):
    path = _derived(tmp_path, "params: {mult: 2}\nset: {blocks.block.nodes.mlp.hidden_dim: '${mult * dim}'}\n")
    assert compile_blueprint(path, device="meta", build=False).checked["trunk.0.mlp"].hidden_dim == 64


def test_set_of_an_extends_file_takes_documented_optional_keys(tmp_path):
    path = _derived(tmp_path, "set: {train.warmup: 7, nodes.head.bias: true, init.std: 0.01}\n")
    cm = compile_blueprint(path, device="meta", build=False)
    assert cm.train_config.warmup == 7 and cm.checked["head"].bias is True
    assert cm.blueprint["init"]["std"] == 0.01


def test_remove_of_a_missing_list_item_is_an_error_not_a_crash(tmp_path):
    path = _derived(tmp_path, "remove: [nodes.x0.in.7]\n")
    assert _error(None, path) == (
        f"resolve error: {path}:4:10: cannot remove nodes.x0.in.7: nodes.x0.in has no item 7\n  fix: items 0..1")


def test_a_typo_in_a_block_params_of_an_extends_file_is_located(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(TINY.read_text().replace("    out: r2\n", "    out: r2\n    params: {width: 4}\n").replace(
        'hidden_dim: "${4 * dim}"', 'hidden_dim: "${width * dim}"'))
    path = tmp_path / "derived.yaml"
    path.write_text("physlm: 1\nextends: base.yaml\nname: derived\nblocks:\n  block:\n    params: {widht: 2}\n")
    assert _error(None, path) == (
        f"resolve error: {path}:6:14: blocks.block.params.widht: blocks.block.params has no key 'widht', and no "
        "${...} uses it\n  fix: did you mean blocks.block.params.width?")
    path.write_text("physlm: 1\nextends: base.yaml\nname: derived\nblocks:\n  block:\n    params: {width: 2}\n")
    assert compile_blueprint(path, device="meta", build=False).checked["trunk.0.mlp"].hidden_dim == 64
