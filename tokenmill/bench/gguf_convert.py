"""Re-encode a GGUF's weights (f32, q8_0, ...) so llama.cpp can be measured in each weight format.

The shipped SmolLM2 GGUF is Q4_1; to put tokenmill's fp32 and int8 beside llama.cpp's f32 and q8_0 on the
same weights, we dequantise each tensor with the `gguf` package and encode it again. Metadata (tokenizer,
chat template, hyper-parameters) is copied unchanged, tensors keep llama.cpp's layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from tokenmill.errors import InvalidParameterError

TARGETS = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
# general.file_type values llama.cpp prints for each (LlamaFileType in gguf.constants).
_FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1",
}


def cache_dir() -> Path:
    return Path.home() / ".cache" / "tokenmill" / "gguf"


def convert_gguf(source: str | Path, target: str, out_dir: Path | None = None) -> Path:
    """Path of `source` re-encoded as `target` (cached: a second call returns the same file)."""
    import gguf

    if target not in TARGETS:
        raise InvalidParameterError(f"GGUF target must be one of {', '.join(TARGETS)}, got {target!r}")
    source = Path(source)
    out_dir = out_dir or cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    destination = out_dir / f"{source.stem}.{target}.gguf"
    if destination.is_file() and destination.stat().st_mtime >= source.stat().st_mtime:
        return destination
    reader = gguf.GGUFReader(str(source))
    architecture = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    partial = destination.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), architecture)
    for field in reader.fields.values():
        if field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE):
            continue
        if field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[target]))
    qtype = getattr(gguf.GGMLQuantizationType, TARGETS[target])
    for tensor in tqdm(reader.tensors, desc=f"GGUF -> {target}", unit="tensor"):
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if values.ndim < 2 or values.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            writer.add_tensor(tensor.name, values)  # norms stay f32, as every llama.cpp export keeps them
            continue
        if target == "f32":
            writer.add_tensor(tensor.name, values)
        elif target == "f16":
            writer.add_tensor(tensor.name, values.astype(np.float16))
        else:
            writer.add_tensor(tensor.name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(destination)
    return destination
