"""Export size, dtype and pack time on the testbed model (CPU): consa export now vs the old fp32 + gzip."""
import json
import sys
import tarfile
import time
from pathlib import Path
import torch
from consa.export.checkpoint import export_hybrid, pack_checkpoint
from consa.model.hybrid_attention import model_shape
from consa.model.loading import load_model
from consa.core.manifest import Allocation

src = sys.argv[1]; out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
model, tok = load_model(src, device="cpu")  # fp32, as a search holds it
L, K = model_shape(model)
g = torch.Generator().manual_seed(0)
full = torch.ones(L, K, dtype=torch.bool); full.view(-1)[torch.randperm(L * K, generator=g)[: L * K // 2]] = False
alloc = Allocation.from_full_mask(full, model=src, granularity="kv_head", window=256)
rec = {"model": src, "layers": L, "kv_heads": K}
def size(d): return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
t = time.perf_counter(); export_hybrid(model, alloc, out / "auto"); rec["export_auto_s"] = round(time.perf_counter() - t, 2)
t = time.perf_counter(); export_hybrid(model, alloc, out / "fp32", dtype="float32"); rec["export_fp32_s"] = round(time.perf_counter() - t, 2)
rec["weights_bytes_auto"] = size(out / "auto"); rec["weights_bytes_fp32"] = size(out / "fp32")
t = time.perf_counter(); tar = pack_checkpoint(out / "auto"); rec["pack_tar_s"] = round(time.perf_counter() - t, 2); rec["tar_bytes"] = tar.stat().st_size
t = time.perf_counter()
with tarfile.open(out / "fp32.tar.gz", "w:gz") as z: z.add(out / "fp32", arcname="fp32")
rec["old_gzip_fp32_s"] = round(time.perf_counter() - t, 2); rec["old_gzip_fp32_bytes"] = (out / "fp32.tar.gz").stat().st_size
# the exported checkpoint through stock transformers with trust_remote_code: the hybrid's loss, not full attention's
import argparse as _a; ids = tok(open(_a.__file__).read(), return_tensors="pt").input_ids[:, :1024]; rec["tokens"] = ids.shape[1]
from transformers import AutoModelForCausalLM
import consa
with torch.no_grad():
    rec["loss_full_fp32"] = round(model(input_ids=ids, labels=ids).loss.item(), 5)
    r = AutoModelForCausalLM.from_pretrained(out / "auto", trust_remote_code=True)
    rec["loss_remote_code_bf16"] = round(r(input_ids=ids, labels=ids).loss.item(), 5)
    rec["loss_load_hybrid_bf16"] = round(consa.load_hybrid(out / "auto")(input_ids=ids, labels=ids).loss.item(), 5)
    from consa.model.hybrid_attention import apply_allocation
    apply_allocation(model, alloc)
    rec["loss_hybrid_fp32"] = round(model(input_ids=ids, labels=ids).loss.item(), 5)
try:
    AutoModelForCausalLM.from_pretrained(out / "auto"); rec["plain_load"] = "loaded"
except ValueError as e:
    rec["plain_load"] = "refused: " + str(e).splitlines()[0][:80]
print(json.dumps(rec, indent=1))
