"""The PyTorch reference: the same CE train step written the straightforward PyTorch way.

forward + cross-entropy + backward + torch.optim.SGD with the Original's
settings, from the same uint8 images turned into normalised pixels in the step
(x / pixel_max, resized for the ViT, then (x - 0.5) / 0.5), in eager mode or
under torch.compile. The model is the benchmark's (bench_models.py spec):
  vit     transformers' ViTForImageClassification; variants: its attention
          implementations ("sdpa", "eager");
  resnet  the CIFAR ResNet written below with torch.nn alone (torchvision's
          layers and names, 3x3 stride-1 stem, no max-pool); variants: memory
          layouts ("nchw", the default one, and "channels_last").

Run as a script it is the torch.compile worker: `python bench_torch.py SPEC_JSON`
prints one JSON line (a fresh process, so a hung compile can be killed). It
needs no JAX.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

import bench_timing as timing

VARIANTS = {"vit": ("sdpa", "eager"), "resnet": ("nchw", "channels_last")}


# ---- the CIFAR ResNet (Unlearn-Sparse models/ResNet.py: torchvision v1.5, CIFAR stem) ----

def _downsample(c_in: int, c_out: int, stride: int) -> nn.Module | None:
  if stride == 1 and c_in == c_out:
    return None
  return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, c_in: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = _downsample(c_in, planes, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, c_in: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: the stride here
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(4 * planes)
    self.downsample = _downsample(c_in, 4 * planes, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """images (B, C, H, W) -> logits; stages of width x (1, 2, 4, 8), later ones halve H and W."""

  def __init__(self, stage_sizes, block: str, width: int, num_classes: int, channels: int = 3):
    super().__init__()
    block_cls = BLOCKS[block]
    self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    c_in, layers = width, []
    for i, n in enumerate(stage_sizes):
      blocks = []
      for j in range(n):
        blocks.append(block_cls(c_in, width * 2 ** i, 2 if i > 0 and j == 0 else 1))
        c_in = width * 2 ** i * block_cls.expansion
      layers.append(nn.Sequential(*blocks))
    # torchvision's names: layer1, layer2, ... (a ModuleList would name them 0, 1, ...).
    for i, layer in enumerate(layers):
      self.add_module(f"layer{i + 1}", layer)
    self.num_stages = len(layers)
    self.fc = nn.Linear(c_in, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    for i in range(self.num_stages):
      x = getattr(self, f"layer{i + 1}")(x)
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet(model: dict) -> ResNet:
  r = model["resnet"]
  return ResNet(r["stage_sizes"], r["block"], r["width"], model["num_classes"], model["channels"])


def _vit(model: dict, attn: str) -> nn.Module:
  import transformers
  v = model["vit"]
  config = transformers.ViTConfig(
      hidden_size=v["hidden_size"], num_hidden_layers=v["depth"],
      num_attention_heads=v["num_heads"], intermediate_size=v["mlp_dim"],
      image_size=v["image_size"], patch_size=v["patch_size"], num_channels=model["channels"],
      num_labels=v["num_classes"], hidden_act="gelu", layer_norm_eps=v["layer_norm_eps"],
      qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  return transformers.ViTForImageClassification._from_config(config, attn_implementation=attn)


# ---- the train step ----

class CEStep:
  """The CE train step of `spec`; a call runs `steps_per_call` steps.

  `spec` is plain JSON: model (bench_models spec), variant, batch_size, dtype,
  steps_per_call, threads, compile, and the Original's SGD (learning_rate,
  momentum, weight_decay).
  """

  def __init__(self, spec: dict):
    torch.set_num_threads(spec["threads"])
    self.device = device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
      # JAX's default float32 matmul precision on GPUs is TF32; match it.
      torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    m, variant = spec["model"], spec["variant"]
    if variant not in VARIANTS[m["arch"]]:
      raise ValueError(f"{m['arch']}: unknown variant {variant!r}; allowed: {VARIANTS[m['arch']]}")
    if m["arch"] == "vit":
      net = _vit(m, variant)
      forward = lambda x: net(pixel_values=x).logits
      size = m["vit"]["image_size"]
    else:
      net = resnet(m)
      forward = net
      size = m["stored_size"]
    layout = torch.channels_last if variant == "channels_last" else torch.contiguous_format
    net = net.to(device, memory_format=layout).train()  # BatchNorm: batch statistics, updated
    self.opt = torch.optim.SGD(net.parameters(), lr=spec["learning_rate"],
                               momentum=spec["momentum"], weight_decay=spec["weight_decay"])

    self.B, self.K = spec["batch_size"], spec["steps_per_call"]
    h, pixel_max = m["stored_size"], m["pixel_max"]
    bf16 = spec["dtype"] == "bfloat16"
    self.n = max(512, 4 * self.B)
    g = torch.Generator(device="cpu").manual_seed(0)
    self.images_u8_NxCxHxW = torch.randint(0, int(pixel_max) + 1, (self.n, m["channels"], h, h),
                                           dtype=torch.uint8, generator=g).to(device)
    self.labels_N = (torch.arange(self.n) % m["num_classes"]).to(device)

    def loss_fn(images_u8_BxCxHxW, labels_B):
      x = images_u8_BxCxHxW.float() / pixel_max
      if h != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
      x = ((x - 0.5) / 0.5).contiguous(memory_format=layout)
      with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
        logits_BxC = forward(x)
      return F.cross_entropy(logits_BxC.float(), labels_B)

    # Compiling the forward + loss compiles the backward too (AOTAutograd).
    self.loss_fn = torch.compile(loss_fn) if spec["compile"] else loss_fn
    self.info = dict(variant=variant, compile=spec["compile"], device=device,
                     torch_version=torch.__version__, num_threads=torch.get_num_threads(),
                     steps_per_call=self.K)

  def __call__(self):
    for _ in range(self.K):
      # Drawn on the device: a host-to-device copy would sync the stream every step.
      idx_B = torch.randint(0, self.n, (self.B,), device=self.device)
      loss = self.loss_fn(self.images_u8_NxCxHxW[idx_B], self.labels_N[idx_B])
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      self.opt.step()
    return loss

  def sync(self, _):
    if self.device == "cuda":
      torch.cuda.synchronize()


def prepare(spec: dict) -> tuple[CEStep, dict]:
  """A step, called once (torch.compile compiles then) and `spec["warmup"]` more times."""
  step = CEStep(spec)
  first_call_s = timing.time_calls(step, 1, step.sync)[0]
  timing.time_calls(step, spec["warmup"], step.sync)
  return step, dict(step.info, first_call_s=first_call_s)


def ce_step(spec: dict) -> dict:
  """Examples/s of CEStep(spec), timed alone (the torch.compile worker)."""
  step, info = prepare(spec)
  times = timing.time_calls(step, spec["num_calls"], step.sync)
  return dict(info, **timing.rates(times, step.K, step.B))


def compiled_in_subprocess(spec: dict, timeout_s: float) -> dict:
  """torch.compile's run, or {"status": "failed: ..."}: a fresh process, so a hang can be killed."""
  cmd = [sys.executable, os.path.abspath(__file__), json.dumps(spec)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return dict(status=f"failed: took more than {timeout_s:.0f} s")
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(status=f"failed: {err[:300]}")
  return dict(json.loads(lines[-1]), status="ok")


def matmul_peak(n: int, dtype: str, num_calls: int, threads: int) -> dict:
  """The benchmark's peak matmul in PyTorch, for context on the JAX / PyTorch ratio."""
  torch.set_num_threads(threads)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  a, b = (torch.randn(n, n, device=device).to(getattr(torch, dtype)) for _ in range(2))
  sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
  sync(a @ b)
  s = statistics.median(timing.time_calls(lambda: a @ b, num_calls, sync))
  return dict(n=n, ms=1e3 * s, gflops_per_s=2 * n**3 / s / 1e9)


if __name__ == "__main__":
  print(json.dumps(ce_step(json.loads(sys.argv[1]))))
