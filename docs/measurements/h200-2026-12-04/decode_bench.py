"""VAE decode of 4 clips at the paper shape (latent 4x16x9x30x52): the policy's way (float32 weights, bf16 autocast)
against channels_last_3d and bf16 weights. Fastest of 3 after a warm-up; output difference to the policy's way."""
import json, os, sys, time
import torch
from diffusers import AutoencoderKLWan
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
shape = (4, 16, 9, 30, 52) if dev.type == "cuda" else (1, 16, 2, 8, 8)
torch.manual_seed(0)
vae = AutoencoderKLWan().to(dev).eval().requires_grad_(False)
z = torch.randn(*shape, device=dev)
res = {}
def sync():
    if dev.type == "cuda": torch.cuda.synchronize()
def timeit(fn, n=3):
    fn(); ts = []
    for _ in range(n):
        sync(); t0 = time.perf_counter(); fn(); sync(); ts.append(time.perf_counter() - t0)
    return min(ts)
def dec(model, dtype, autocast):
    def f():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            return model.decode(z.to(dtype)).sample.float()
    return f
ref = dec(vae, torch.float32, True)()
variants = {"fp32w_autocast": (vae, torch.float32, True)}
res["fp32w_autocast"] = timeit(dec(vae, torch.float32, True))
def cl3d(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
    return model
vae_cl = cl3d(vae)
res["fp32w_autocast_cl3d"] = timeit(dec(vae_cl, torch.float32, True))
out = dec(vae_cl, torch.float32, True)(); res["cl3d_maxdiff"] = float((out - ref).abs().max())
vae_bf = AutoencoderKLWan().to(dev).eval().requires_grad_(False); vae_bf.load_state_dict(vae.state_dict()); vae_bf.to(torch.bfloat16)
res["bf16w"] = timeit(dec(vae_bf, torch.bfloat16, False))
out = dec(vae_bf, torch.bfloat16, False)(); res["bf16w_maxdiff"] = float((out - ref).abs().max())
vae_bf = cl3d(vae_bf)
res["bf16w_cl3d"] = timeit(dec(vae_bf, torch.bfloat16, False))
print(json.dumps(res))
out_dir = os.environ.get("OUT")
if out_dir: open(os.path.join(out_dir, "decode.json"), "w").write(json.dumps(res, indent=1))
