"""FasterViT: convolutional early stages, then hierarchical attention (HAT) with carrier tokens.

Follows the authors' PyPI package ``fastervit`` 1.0.0 (``fastervit/models/faster_vit.py`` and, for
inputs of any size, ``faster_vit_any_res.py``):

* stem: two 3x3 stride-2 convolutions without bias, each followed by BatchNorm (eps 1e-4) and ReLU;
* stages 1-2: residual blocks conv3x3 -> BN -> GELU -> conv3x3 -> BN;
* downsampler: LayerNorm2d (eps 1e-6, timm's default) then a 3x3 stride-2 convolution, no bias;
* stages 3-4: HAT blocks over 7x7 windows. A stage with carrier tokens (``carrier_tokens``
  context) pools the stage input into a grid of ``ct_size x ct_size`` carrier tokens per window.
  In every block the carrier tokens first attend among themselves (all of them, with their own
  log-spaced continuous positional bias and an MLP positional embedding), then each window's
  tokens and its own carrier tokens attend together (window tokens with the window's continuous
  bias, anything involving a carrier token without bias); both token kinds share the norms, the
  qkv/proj and the MLP of the block. The updated carrier tokens go to the next block.
* final BatchNorm2d, average pooling, linear head.

Details of the code that the paper does not state, followed here:

* The positional biases are Swin-V2's continuous ones: an MLP (2 -> 512 -> heads) of log-spaced
  relative coordinates, ``16 * sigmoid``. Window tokens also get an absolute positional embedding
  (an MLP 2 -> 512 -> dim of their coordinates in the window, normalised by ``n // 2``) in every
  block; the carrier grid gets one too.
* Carrier tokens come from a depthwise 3x3 convolution (with bias) then an average pooling whose
  kernel and stride are derived from the map size: ``out = ct_size * H / window``,
  ``stride = int(H / out)``, ``kernel = H - (out - 1) * stride`` (5 and 3 at 14x14: the pools
  overlap).
* ``do_propagation`` (FasterViT-3/4): the last HAT block of a stage adds its carrier tokens,
  nearest-upsampled to the window, times the carrier attention's layer scale, to the map.
* The last stage has no carrier tokens (``hat = [False, False, True, False]``): plain windows.

Inputs of any size, as in the authors' ``faster_vit_any_res.py`` (written for detection): each
attention stage zero-pads its map at the bottom/right to a multiple of the window once, before
computing the carrier tokens, runs all its blocks on the padded map (the padded tokens take part
as keys and are updated like any token) and crops at the end of the stage. The carrier grid and
pooling follow the padded size; a map that pads to a single window gets no carrier tokens (their
``do_sr_hat``). Their code builds all of this for one resolution fixed at construction and only
handles square carrier grids (for a non-square grid it drops the carrier positional embedding and
hands carrier tokens to the wrong windows); here everything is derived from the actual map at
run time, per axis, which is identical to theirs for every square grid (224x224 included). The
padded stage map travels between blocks in the stage state (``StageState.padded``), so each
block returns the cropped map and the next block resumes from the padded one.

Training-only difference: the authors apply DropPath to each window (their tensors are windows);
here it drops per image.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp
from torch import nn

from ..kernels import na2d
from .attention import check_heads
from .layers import NCHW, NHWC, LayerNorm2d, conv_length
from .registry import Positive, SpecError, read_context, register

CPB_HIDDEN = 512  # hidden width of the authors' positional MLPs


class StageState(NamedTuple):
    """What a FasterViT stage hands from block to block."""
    carrier: Optional[torch.Tensor]  # (B, Hc, Wc, C): ct_size x ct_size carrier tokens per window
    padded: Optional[torch.Tensor]  # (B, Hp, Wp, C): the window-padded map after the last block


# ------------------------------------------------------------------------------------------------
# Convolutional part


@register("stem", "fastervit_stem")
class FasterViTStem(nn.Module):
    """Two 3x3 stride-2 convolutions (no bias), each with BatchNorm (eps 1e-4) and ReLU."""
    layout = NCHW
    downscale = 4
    out_length = conv_length(3, 2, 1, convs=2)
    first_conv = "conv_down.0"

    def __init__(self, in_chans: int, out_dim: int, hidden_dim: int = 64):
        super().__init__()
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, hidden_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(hidden_dim, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, out_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(out_dim, eps=1e-4),
            nn.ReLU(),
        )

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        if params["hidden_dim"] < 1:
            raise SpecError("hidden_dim", f"must be >= 1, got {params['hidden_dim']}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_down(x)


@register("downsample", "fastervit_downsample")
class FasterViTDownsample(nn.Module):
    """LayerNorm2d (eps 1e-6) then a 3x3 stride-2 convolution without bias."""
    layout = NCHW
    downscale = 2
    out_length = conv_length(3, 2, 1)

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = LayerNorm2d(in_dim, eps=1e-6)
        self.reduction = nn.Conv2d(in_dim, out_dim, 3, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(x))


@register("block", "fastervit_conv")
class FasterViTConvBlock(nn.Module):
    """x + conv3x3 -> BN -> GELU -> conv3x3 -> BN (times an optional layer scale)."""
    layout = NCHW

    def __init__(self, dim: int, layer_scale: Optional[Positive] = None, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm1 = nn.BatchNorm2d(dim)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)


# ------------------------------------------------------------------------------------------------
# Positional encodings (functions of the grid size, so any map size works)


def _cpb_mlp(out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, CPB_HIDDEN), nn.ReLU(), nn.Linear(CPB_HIDDEN, out_dim, bias=False))


def _grid_coords(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(h*w, 2) token coordinates (row, col), each axis centred and divided by n // 2."""
    axes = []
    for n in (h, w):
        c = torch.arange(n, device=like.device, dtype=like.dtype) - n // 2
        axes.append(c / max(n // 2, 1))
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(h * w, 2)


def _log_relative_coords(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(2h-1, 2w-1, 2) Swin-V2 log-spaced relative coordinates (row, col) of a h x w grid."""
    axes = []
    for n in (h, w):
        c = torch.arange(-(n - 1), n, device=like.device, dtype=torch.float32)
        axes.append(c / max(n - 1, 1))  # a 1-token axis has only offset 0
    table = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1) * 8
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table.to(like.dtype)


class ContinuousBiasAttention(nn.Module):
    """qkv/proj attention whose relative bias over an h x w grid is an MLP of log-spaced relative
    coordinates (Swin-V2 CPB), given to na2d as its (heads, 2h-1, 2w-1) table."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.cpb = _cpb_mlp(heads)

    def bias_table(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        # The authors' table is indexed by query - key, na2d's by key - query: flip both axes.
        table = 16 * torch.sigmoid(self.cpb(_log_relative_coords(h, w, like)))
        return table.flip(0, 1).permute(2, 0, 1)

    def split_qkv(self, x: torch.Tensor):
        B, H, W, _ = x.shape
        return self.qkv(x).reshape(B, H, W, 3, self.heads, self.head_dim).unbind(3)

    def project(self, out: torch.Tensor) -> torch.Tensor:
        return self.proj(out.flatten(-2))

    def forward_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Full attention over the whole (B, H, W, C) grid (the carrier tokens among themselves):
        a window as large as the grid."""
        _, H, W, _ = x.shape
        q, k, v = self.split_qkv(x)
        return self.project(na2d(q, k, v, (H, W), 1, rpb=self.bias_table(H, W, x)))

    def forward_windows(self, x: torch.Tensor, window: int, carrier: Optional[torch.Tensor] = None):
        """Blocked window attention over a padded (B, Hp, Wp, C) map; with carrier tokens
        (B, nh*e, nw*e, C), each window's e x e carrier tokens join it as keys and as queries.

        Window queries see their window (with bias) and its carrier tokens (no bias): na2d with
        per-window extra tokens. Carrier queries see their window's carrier tokens and its tokens,
        all without bias: the same op on the carrier grid, blocked by e, with the window's tokens
        as its per-window extra tokens."""
        q, k, v = self.split_qkv(x)
        rpb = self.bias_table(window, window, x)
        if carrier is None:
            return self.project(na2d(q, k, v, window, window, rpb=rpb)), None
        B, Hp, Wp = x.shape[:3]
        nh, nw = Hp // window, Wp // window
        e = carrier.shape[1] // nh
        qc, kc, vc = self.split_qkv(carrier)
        out = na2d(q, k, v, window, window, rpb=rpb,
                   additional_keys=_per_window(kc, nh, nw), additional_values=_per_window(vc, nh, nw))
        out_c = na2d(qc, kc, vc, e, e,
                     additional_keys=_per_window(k, nh, nw), additional_values=_per_window(v, nh, nw))
        return self.project(out), self.project(out_c)


def _per_window(t: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """(B, nh*a, nw*b, heads, D) -> (B, nh, nw, a*b, heads, D): the tokens of each window."""
    B, H, W, heads, d = t.shape
    t = t.reshape(B, nh, H // nh, nw, W // nw, heads, d).permute(0, 1, 3, 2, 4, 5, 6)
    return t.reshape(B, nh, nw, -1, heads, d)


# ------------------------------------------------------------------------------------------------
# Carrier tokens and the HAT block


def _pad_to_windows(x: torch.Tensor, window: int, channels_last: bool) -> torch.Tensor:
    """Zero-pad the bottom/right to a multiple of the window (the authors' any-res code)."""
    H, W = x.shape[1:3] if channels_last else x.shape[2:]
    pad_h, pad_w = -H % window, -W % window
    if not (pad_h or pad_w):
        return x
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h) if channels_last else (0, pad_w, 0, pad_h))


@register("context", "carrier_tokens")
class CarrierTokens(nn.Module):
    """The stage's initial carrier tokens: depthwise 3x3 conv, then an average pool to
    ``ct_size x ct_size`` tokens per window of the window-padded map (the authors'
    TokenInitializer). A map that pads to a single window gets none (as in their any-res code)."""
    layout = NCHW

    def __init__(self, dim: int, window_size: int = 7, ct_size: int = 2):
        super().__init__()
        self.window_size = window_size
        self.ct_size = ct_size
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        w, ct = params["window_size"], params["ct_size"]
        if w < 1:
            raise SpecError("window_size", f"must be >= 1, got {w}")
        if not 1 <= ct <= w:
            raise SpecError("ct_size", f"must be in [1, window_size={w}], got {ct}")

    def pool_geometry(self, length: int) -> Tuple[int, int]:
        """(kernel, stride) of the pool along an axis of the padded length (authors' formula)."""
        out = self.ct_size * length // self.window_size
        stride = length // out
        return length - (out - 1) * stride, stride

    def forward(self, x: torch.Tensor) -> StageState:
        x = _pad_to_windows(x, self.window_size, channels_last=False)
        Hp, Wp = x.shape[2:]
        if Hp == self.window_size and Wp == self.window_size:
            return StageState(None, None)
        (kh, sh), (kw, sw) = self.pool_geometry(Hp), self.pool_geometry(Wp)
        ct = F.avg_pool2d(self.pos_embed(x), (kh, kw), (sh, sw))
        return StageState(ct.permute(0, 2, 3, 1), None)


@register("block", "hat")
class HATBlock(nn.Module):
    """FasterViT's hierarchical attention block over windows of ``window_size``.

    ``hat``: the block has carrier-token layers (the stage needs a ``carrier_tokens`` context);
    ``propagate``: add the carrier tokens back into the map at the end of the block (the authors'
    ``do_propagation``, which they apply in the last block of a stage).
    Returns ``(x, StageState)``; see the module docstring for padding.
    """
    layout = NHWC

    def __init__(self, dim: int, heads: int, window_size: int = 7, mlp_ratio: Positive = 4.0,
                 qkv_bias: bool = True, layer_scale: Optional[Positive] = None, hat: bool = False,
                 propagate: bool = False, drop_path: float = 0.0):
        super().__init__()
        self.window_size = window_size
        self.hat = hat
        self.propagate = propagate
        hidden = int(dim * mlp_ratio)

        def scale():
            return LayerScale(dim, layer_scale) if layer_scale else nn.Identity()

        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.pos_embed = _cpb_mlp(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ContinuousBiasAttention(dim, heads, qkv_bias)
        self.ls1 = scale()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)
        self.ls2 = scale()
        if hat:
            self.hat_pos_embed = _cpb_mlp(dim)
            self.hat_norm1 = nn.LayerNorm(dim)
            self.hat_attn = ContinuousBiasAttention(dim, heads, qkv_bias)
            self.hat_ls1 = scale()
            self.hat_norm2 = nn.LayerNorm(dim)
            self.hat_mlp = Mlp(dim, hidden)
            self.hat_ls2 = scale()

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        check_heads(params, ctx)
        if params["window_size"] < 1:
            raise SpecError("window_size", f"must be >= 1, got {params['window_size']}")
        if params["propagate"] and not params["hat"]:
            raise SpecError("propagate", "needs carrier tokens (hat: true)")
        # Every HAT block reads the stage state as carrier tokens; with hat: true there must be some.
        carrier = read_context(ctx, "carrier_tokens", "hat", required=params["hat"])
        if carrier is not None and carrier["window_size"] != params["window_size"]:
            raise SpecError("window_size", f"must equal the stage's carrier_tokens window_size "
                                           f"{carrier['window_size']}, got {params['window_size']}")

    def _resume(self, x: torch.Tensor, ctx: Optional[StageState]) -> torch.Tensor:
        """The stage's padded map: the previous block's padded tokens around x, or zeros."""
        if ctx is None or ctx.padded is None:
            return _pad_to_windows(x, self.window_size, channels_last=True)
        H, W = x.shape[1:3]
        p = ctx.padded
        return torch.cat([torch.cat([x, p[:, :H, W:]], 2), p[:, H:]], 1)

    def _upsample(self, ct: torch.Tensor, Hp: int, Wp: int) -> torch.Tensor:
        """Nearest upsampling of each window's e x e carrier tokens to the window's size."""
        w, e = self.window_size, ct.shape[1] // (Hp // self.window_size)
        rows, cols = (torch.arange(n, device=ct.device) for n in (Hp, Wp))
        rows = rows // w * e + rows % w * e // w
        cols = cols // w * e + cols % w * e // w
        return ct[:, rows][:, :, cols]

    def forward(self, x: torch.Tensor, ctx: Optional[StageState] = None):
        if self.hat and ctx is None:
            raise RuntimeError("a HAT block with hat: true needs the stage's carrier_tokens context")
        H, W = x.shape[1:3]
        x = self._resume(x, ctx)
        Hp, Wp, w = x.shape[1], x.shape[2], self.window_size
        x = x + self.pos_embed(_grid_coords(w, w, x)).reshape(w, w, -1).repeat(Hp // w, Wp // w, 1)

        ct = ctx.carrier if ctx is not None else None
        if ct is not None and self.hat:
            hc, wc = ct.shape[1:3]
            if hc % (Hp // w) or wc % (Wp // w):
                raise RuntimeError(f"carrier grid {hc}x{wc} does not split into the {Hp // w}x{Wp // w} "
                                   f"windows: the context's window_size must be the blocks' ({w})")
            ct = ct + self.hat_pos_embed(_grid_coords(hc, wc, ct)).reshape(hc, wc, -1)
            ct = ct + self.drop_path(self.hat_ls1(self.hat_attn.forward_grid(self.hat_norm1(ct))))
            ct = ct + self.drop_path(self.hat_ls2(self.hat_mlp(self.hat_norm2(ct))))
            y, y_ct = self.attn.forward_windows(self.norm1(x), w, self.norm1(ct))
            ct = ct + self.drop_path(self.ls1(y_ct))
            ct = ct + self.drop_path(self.ls2(self.mlp(self.norm2(ct))))
        else:
            y, _ = self.attn.forward_windows(self.norm1(x), w)
        x = x + self.drop_path(self.ls1(y))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        if self.propagate and ct is not None:
            x = x + self.hat_ls1(self._upsample(ct, Hp, Wp))

        padded = x if (Hp, Wp) != (H, W) else None
        state = StageState(ct, padded)
        if padded is not None:
            x = x[:, :H, :W]
        return x, state
