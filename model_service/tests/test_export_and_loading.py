"""Export writes a verifiable artifact; loading refuses tampered or non-reproducing ones."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from grandmodel_service import nets
from grandmodel_service.engine import ModelLoadError, load_model
from grandmodel_service.export import export_model, main
from grandmodel_service.manifest import Manifest


@pytest.mark.parametrize(("name", "shape"), [("strategic", [48, 13]), ("tactical", [60, 7])])
def test_manifest_describes_the_artifact(artifacts: Path, name: str, shape: list[int]) -> None:
    data = json.loads((artifacts / f"{name}.manifest.json").read_text())
    artifact = artifacts / data["artifact"]
    assert data["name"] == name
    assert data["version"] == "1.2.3"
    assert data["created_at"].endswith("Z")
    assert data["sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()
    domain = data["input"].pop("domain")
    assert data["input"] == {"shape": shape, "dtype": "float32", "batch_dim": 0}
    assert domain["source"] == "default"
    assert [f["name"] for f in domain["features"]] == [f"f{i}" for i in range(shape[1])]
    assert {(f["min"], f["max"]) for f in domain["features"]} == {(-1e4, 1e4)}
    assert data["output"]["actions"] == ["short", "neutral", "long"]
    samples = data["golden"]["samples"]
    assert len(samples) == 4
    assert np.asarray(samples[0]["input"]).shape == tuple(shape)
    assert abs(sum(samples[0]["probabilities"]) - 1) < 1e-5
    assert samples[0]["action"] in nets.ACTIONS


def test_loads_verifies_and_predicts(artifacts: Path) -> None:
    model = load_model(artifacts / "strategic.manifest.json", "strategic")
    out = model.predict(np.zeros((3, 48, 13), dtype=np.float32))
    assert out.probabilities.shape == (3, 3)
    assert out.value.shape == (3,)
    np.testing.assert_allclose(out.probabilities.sum(axis=1), 1, atol=1e-6)


def test_export_is_reproducible_from_seed(tmp_path: Path, artifacts: Path) -> None:
    again = Manifest.read(export_model("strategic", tmp_path, version="1.2.3"))
    first = Manifest.read(artifacts / "strategic.manifest.json")
    assert again.golden == first.golden


def test_export_from_state_dict(tmp_path: Path) -> None:
    model = nets.build("tactical", seed=7)
    state_path = tmp_path / "tactical.state.pt"
    torch.save(model.state_dict(), state_path)
    assert (
        main(
            [
                "--out",
                str(tmp_path / "out"),
                "--model",
                "tactical",
                "--state-dict",
                f"tactical={state_path}",
                "--version",
                "2.0.0",
            ]
        )
        == 0
    )
    manifest = Manifest.read(tmp_path / "out" / "tactical.manifest.json")
    assert manifest.version == "2.0.0"
    assert manifest.raw["source"] == {"state_dict": str(state_path)}
    loaded = load_model(tmp_path / "out" / "tactical.manifest.json", "tactical")
    x = np.ones((1, 60, 7), dtype=np.float32)
    with torch.inference_mode():
        logits, _ = model(torch.from_numpy(x))
    np.testing.assert_allclose(
        loaded.predict(x).probabilities, torch.softmax(logits, -1).numpy(), atol=1e-6
    )


def test_a_bigger_model_exports_loads_and_answers_the_same_requests(tmp_path: Path) -> None:
    """--hidden and --depth size the trunk; the service loads and verifies it like any release.

    The shipped actors (depth 0) have no extra weights; sizes beyond the bounds are refused.
    """
    args = ["--out", str(tmp_path), "--model", "strategic", "--hidden", "32", "--depth", "3"]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "strategic.manifest.json").read_text())
    assert manifest["architecture"]["hidden"] == 32
    assert manifest["architecture"]["depth"] == 3
    loaded = load_model(tmp_path / "strategic.manifest.json", "strategic")
    out = loaded.predict(np.zeros((2, 48, 13), dtype=np.float32))
    assert out.probabilities.shape == (2, 3)
    keys = set(nets.build("strategic", seed=7).state_dict())
    assert not any(k.startswith("deep.") for k in keys)
    spec = nets.ModelSpec("strategic", bars=48, features=13, patch=4, depth=2)
    deep = nets.build("strategic", seed=7, spec=spec)
    assert {k for k in deep.state_dict() if k.startswith("deep.")} == {
        "deep.0.weight",
        "deep.0.bias",
        "deep.1.weight",
        "deep.1.bias",
    }
    with pytest.raises(ValueError, match="depth=999 must be between 0 and 256"):
        export_model("strategic", tmp_path / "no", depth=999)
    with pytest.raises(ValueError, match="hidden=0 must be between 1 and 4096"):
        export_model("strategic", tmp_path / "no", hidden=0)
    assert not (tmp_path / "no").exists()


def test_tampered_artifact_is_refused(artifact_copy: Path) -> None:
    manifest = Manifest.read(artifact_copy / "strategic.manifest.json")
    data = bytearray(manifest.artifact_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    manifest.artifact_path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        load_model(artifact_copy / "strategic.manifest.json", "strategic")


def test_wrong_golden_sample_is_refused(artifact_copy: Path) -> None:
    path = artifact_copy / "strategic.manifest.json"
    data = json.loads(path.read_text())
    data["golden"]["samples"][1]["probabilities"][0] += 1e-3
    path.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="golden sample 1 does not reproduce"):
        load_model(path, "strategic")


def test_other_weights_with_matching_hash_fail_the_golden_check(artifact_copy: Path) -> None:
    """A different model whose manifest hash was updated still fails on its goldens."""
    other = export_model("strategic", artifact_copy / "other", version="1.2.3", seed=99)
    path = artifact_copy / "strategic.manifest.json"
    data = json.loads(path.read_text())
    other_manifest = Manifest.read(other)
    data["artifact"] = f"other/{other_manifest.artifact}"
    data["sha256"] = other_manifest.sha256
    path.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="does not reproduce"):
        load_model(path, "strategic")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("sha256"), "incomplete"),
        (lambda d: d.update(name="tactical"), "not 'strategic'"),
        (lambda d: d["input"].update(dtype="float64"), "unsupported input dtype"),
        (lambda d: d.update(artifact="missing.pt"), "cannot read artifact"),
        (lambda d: d["golden"].update(samples=[]), "no golden samples"),
    ],
)
def test_broken_manifests_are_refused(artifact_copy: Path, mutate, message: str) -> None:
    path = artifact_copy / "strategic.manifest.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=message):
        load_model(path, "strategic")


def test_missing_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read manifest"):
        load_model(tmp_path / "nope.manifest.json", "strategic")


def test_mc_dropout_spreads_while_plain_inference_is_deterministic(artifacts: Path) -> None:
    model = load_model(artifacts / "strategic.manifest.json", "strategic")
    x = np.random.default_rng(3).standard_normal((4, 48, 13), dtype=np.float32)
    first, second = model.predict(x), model.predict(x)
    np.testing.assert_array_equal(first.probabilities, second.probabilities)
    mc = model.predict_mc(x, 32)
    assert mc.mc_std is not None
    assert mc.mc_value_std is not None
    assert mc.mc_mean is not None
    assert (mc.mc_std > 0).all()
    assert (mc.mc_value_std > 0).all()
    np.testing.assert_allclose(mc.mc_mean.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(mc.probabilities, first.probabilities)
