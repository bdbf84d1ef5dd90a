"""Host time torch's activation checkpointing adds per aten op, on tiny tensors (compute ~0).

Four LLaMA-like blocks (RMSNorm, q/k/v/o, SDPA, SwiGLU), 16 wide, run as training steps
(gradients None, fresh forward, backward) with no checkpointing, full and selective (fxshard's
policy), on the CPU with one thread: the difference per forward aten op is the host cost of
checkpointing, which a GPU step pays too when its kernels are shorter (docs/calibration.md).

    python benchmarks/sac_overhead.py [--device cuda]

On CUDA the tensors are as tiny, so every step is host-bound and the times are host times
(synchronised at the end of each phase).
"""
import argparse, statistics, time, torch
import torch.utils.checkpoint as ckpt
from torch.utils._python_dispatch import TorchDispatchMode
from fxshard.runtime.checkpointing import _selective_context

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cpu")
dev = torch.device(parser.parse_args().device)
torch.set_num_threads(1)
torch.manual_seed(0)

class Block(torch.nn.Module):  # llama-like: rmsnorm, qkv, sdpa, o, rmsnorm, swiglu
    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d, bias=False) for _ in range(4))
        self.g, self.u, self.dn = torch.nn.Linear(d, 4 * d, bias=False), torch.nn.Linear(d, 4 * d, bias=False), torch.nn.Linear(4 * d, d, bias=False)
        self.w1, self.w2 = torch.nn.Parameter(torch.ones(d)), torch.nn.Parameter(torch.ones(d))
    def norm(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    def forward(self, x):
        h = self.norm(x, self.w1)
        b, s, d = h.shape
        q, k, v = (m(h).view(b, s, 2, d // 2).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, d))
        h = self.norm(x, self.w2)
        return x + self.dn(torch.nn.functional.silu(self.g(h)) * self.u(h))

class Count(TorchDispatchMode):
    n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        Count.n += 1
        return func(*args, **(kwargs or {}))

blocks = torch.nn.ModuleList(Block() for _ in range(4)).to(dev)
x0 = torch.randn(2, 8, 16, device=dev)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

def run(policy):
    def f(x):
        for b in blocks:
            if policy == "none":
                x = b(x)
            elif policy == "full":
                x = ckpt.checkpoint(b, x, use_reentrant=False)
            else:
                x = ckpt.checkpoint(b, x, use_reentrant=False, context_fn=_selective_context)
        return x
    return f

with Count():
    run("none")(x0.clone().requires_grad_())
ops = Count.n
print(f"aten ops per forward (4 blocks): {ops}")
res = {}
for policy in ("none", "full", "selective"):
    f = run(policy)
    fw, bw = [], []
    for i in range(60):
        for p in blocks.parameters():
            p.grad = None
        x = x0.clone().requires_grad_()
        sync(); t = time.perf_counter(); y = f(x); sync(); t1 = time.perf_counter()
        y.sum().backward(); sync(); t2 = time.perf_counter()
        if i >= 10:
            fw.append(t1 - t); bw.append(t2 - t1)
    res[policy] = (statistics.median(fw), statistics.median(bw))
    print(f"{policy:9s} fwd {res[policy][0]*1e3:7.3f} ms  bwd {res[policy][1]*1e3:7.3f} ms")
for policy in ("full", "selective"):
    df = (res[policy][0] - res["none"][0]) / ops * 1e6
    db = (res[policy][1] - res["none"][1]) / ops * 1e6
    print(f"{policy}: extra host time per forward aten op: fwd {df:.1f} us, bwd {db:.1f} us")
