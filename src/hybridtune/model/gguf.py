"""A GGUF file as a model: de-quantized once into a plain transformers dir in the cache.

    model: path/to/model.gguf                       # or
    model: {name: path/to/dir, gguf_file: model.gguf}

GGUF (llama.cpp's format) holds the weights, quantized or not, the tokenizer (vocabulary, merges,
special tokens) and the chat template as metadata. transformers reads it for the architectures in
`transformers.modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES` (`from_pretrained(...,
gguf_file=...)`) and de-quantizes on every load, and the loaded model carries a GGUF "quantizer" that
refuses `save_pretrained`. So the first use writes a plain copy (safetensors, config, tokenizer with
its chat template) to `$HYBRIDTUNE_CACHE/gguf/<file stem>-<sha256 prefix>` (default
`~/.cache/hybridtune/gguf/...`); every later use is an ordinary `from_pretrained` of that dir.

The entry is named by the file's content (SHA-256), so a changed file gets a new entry and two paths
to one file share one. Hashing streams the file once; the digest is remembered in
`gguf/hashes.json` by (path, size, mtime), so a later run hashes nothing. An entry is published
whole (`rundir.publish_dir`: temp dir, then rename), so a crash or a concurrent run never leaves a
half-written one. bundled:smollm2 is this, applied to the GGUF file in its pip package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from hybridtune import rundir
from hybridtune.errors import UserError

MAGIC = b"GGUF"  # the first four bytes of every GGUF file (llama.cpp's gguf.md)
SOURCE = "hybridtune-source.json"  # in each entry: what it was made from


def cache_root() -> Path:
    return Path(os.environ.get("HYBRIDTUNE_CACHE") or Path.home() / ".cache" / "hybridtune").expanduser()


def is_gguf_name(name: str) -> bool:
    return name.lower().endswith(".gguf")


def plain_dir(gguf: Path, where: str = "model.name") -> Path:
    """The cached plain model dir of a GGUF file, written on first use."""
    _check_file(gguf, where)
    digest = content_hash(gguf)
    entry = cache_root() / "gguf" / f"{gguf.stem}-{digest[:16]}"
    if (entry / SOURCE).is_file():
        return entry
    if importlib.util.find_spec("gguf") is None:
        raise UserError(where, f"'{gguf}' and the package gguf not installed", "`pip install gguf`")

    def write(tmp: Path) -> None:
        _convert(gguf, tmp, where)
        source = {"gguf": gguf.name, "bytes": gguf.stat().st_size, "sha256": digest}
        (tmp / SOURCE).write_text(json.dumps(source) + "\n", encoding="utf-8")

    try:
        rundir.publish_dir(entry, write)
    except OSError as e:
        raise UserError(
            f"cache dir {entry.parent}",
            f"a dir that cannot be written ({e.strerror or e})",
            "a writable dir with free space: set HYBRIDTUNE_CACHE",
        ) from None
    return entry


def _check_file(gguf: Path, where: str) -> None:
    if not gguf.is_file():
        raise UserError(
            where,
            f"'{gguf}' (no such file)",
            "a .gguf file (a hub GGUF: download it first, e.g. `hf download ORG/REPO FILE.gguf`)",
        )
    with gguf.open("rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise UserError(
            where, f"'{gguf}', not a GGUF file (it starts with {head!r})", f"a file starting {MAGIC!r}"
        )


def content_hash(path: Path) -> str:
    """SHA-256 of the file, streamed; remembered by (path, size, mtime) so that it is computed once."""
    stat = path.stat()
    key = str(path.resolve())
    memo_file = cache_root() / "gguf" / "hashes.json"
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    known = memo.get(key)
    if known and known["bytes"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
        return known["sha256"]
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    memo[key] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    try:  # the memo only saves time: a failed write (read-only cache, a concurrent writer) costs a re-hash
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        rundir.write_text(memo_file, json.dumps(memo, indent=1) + "\n")
    except (OSError, UserError):
        pass
    return digest


def architecture(gguf: Path, where: str = "model.name") -> str:
    """`general.architecture` of the file (a corrupt or truncated file: UserError)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(gguf).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as e:  # gguf raises ValueError, KeyError, IndexError on a damaged file
        raise UserError(
            where,
            f"'{gguf}', an unreadable GGUF file, truncated or damaged ({type(e).__name__}: {e})",
            "a complete GGUF file",
        ) from None


def _convert(gguf: Path, out: Path, where: str) -> None:
    """Load the GGUF with transformers (de-quantizing it), save a plain copy into `out`."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = architecture(gguf, where)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    folder, name = gguf.parent, gguf.name
    try:
        try:
            model_type = AutoConfig.from_pretrained(folder, gguf_file=name).model_type
        except ValueError as e:
            if "not supported" not in str(e):
                raise
            raise UserError(
                where,
                f"'{name}', a GGUF of architecture '{arch}', which transformers "
                f"{transformers.__version__} cannot read",
                "a GGUF of one of "
                + ", ".join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})),
            ) from None
        # a line of its own only once the file is known to be readable: a refusal stays one line
        print(f"hybridtune: writing a plain copy of {name} to {out.parent} (once)", file=sys.stderr)
        auto = AutoModelForCausalLM if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModel
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = auto.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, NotImplementedError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            where,
            f"'{gguf.name}', which transformers could not load ({type(e).__name__}: {first})",
            "a GGUF file transformers reads",
        ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    # the weights are plain float tensors now; what remains of the GGUF quantizer only blocks saving
    # (transformers 5: modeling_utils.save_pretrained refuses a non-serializable hf_quantizer)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
