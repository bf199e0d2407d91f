"""The one model class: stem -> stages -> norm -> head, speaking timm's model API."""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple, Union

import torch
from timm.layers import (ClassifierHead, NormMlpClassifierHead, register_notrace_function,
                         register_notrace_module, trunc_normal_)
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from zoo.blocks import build, lookup
from zoo.blocks.layers import NCHW, to_layout
from zoo.config import (MIN_INPUT, MODEL_OVERRIDES, ModelConfig, StageConfig, load_config, pool_problem,
                         value_problem)


@register_notrace_module  # windows and padding are decided per input size: a leaf for FX
class Stage(nn.Module):
    """An optional downsampler, optional stage-level context, then the blocks.

    Stage-level state shared by the blocks (GC-ViT's global queries, FasterViT's carrier tokens)
    comes from ``context`` and is handed to every block explicitly; a block may return
    ``(x, ctx)`` to pass an updated state to the next one.
    """

    def __init__(self, cfg: StageConfig, in_dim: int, drop_paths: List[float]):
        super().__init__()
        # A downsampler with ``replaces_first_block`` is the stage's first block run at stride 2
        # (MaxViT's MBConv): it takes that block's place and drop-path rate.
        fused = cfg.downsample is not None and getattr(
            lookup("downsample", cfg.downsample["type"]), "replaces_first_block", False)
        self.downsample = build("downsample", cfg.downsample, in_dim=in_dim, out_dim=cfg.dim,
                                **({"drop_path": drop_paths[0]} if fused else {}))
        self.context = build("context", cfg.context, dim=cfg.dim)
        blocks, self.block_units = [], []  # block_units[j]: the repetition of the unit block j is in
        for i, (unit, dp) in enumerate(zip(cfg.units, drop_paths)):
            unit = unit[1:] if fused and i == 0 else unit
            blocks += [build("block", spec, dim=cfg.dim, drop_path=dp) for spec in unit]
            self.block_units += [i] * len(unit)
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False
        first = self.downsample or self.context or self.blocks[0]
        self.in_layout = first.layout
        self.out_layout = self.blocks[-1].layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.in_layout
        if self.downsample is not None:
            x = self.downsample(x)
        ctx = None
        if self.context is not None:
            x = to_layout(x, layout, self.context.layout)
            layout = self.context.layout
            ctx = self.context(x)
        for blk in self.blocks:
            x = to_layout(x, layout, blk.layout)
            layout = blk.layout
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                out = checkpoint(blk, x, ctx, use_reentrant=False)
            else:
                out = blk(x, ctx)
            if isinstance(out, tuple):
                x, ctx = out
            else:
                x = out
        return x


@register_notrace_function  # runs (not traced) in timm's FX feature extraction
def check_image_batch(x: torch.Tensor, name: str, in_chans: int) -> None:
    """ValueError naming the model unless ``x`` is a floating point (B, in_chans, H, W) batch of at
    least MIN_INPUT pixels a side."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected an image batch of shape (B, {in_chans}, H, W), got {shape}")
    if x.shape[1] != in_chans:
        raise ValueError(f"{name}: expected {in_chans} input channels, got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)}; images are (B, C, H, W))")
    if x.shape[2] < MIN_INPUT or x.shape[3] < MIN_INPUT:
        raise ValueError(f"{name}: input must be at least {MIN_INPUT}x{MIN_INPUT}, got {x.shape[2]}x{x.shape[3]}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating point image batch, got {x.dtype}")


class Backbone(nn.Module):
    """Every zoo model. Build from a validated ``ModelConfig`` (or a path, name or dict)."""

    def __init__(self, cfg: Union[ModelConfig, str, dict], num_classes: Optional[int] = None,
                 in_chans: Optional[int] = None, global_pool: Optional[str] = None,
                 drop_rate: Optional[float] = None, drop_path_rate: Optional[float] = None,
                 device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            cfg = load_config(cfg)
        self.cfg = cfg
        self.num_classes = cfg.num_classes if num_classes is None else num_classes
        self.in_chans = cfg.in_chans if in_chans is None else in_chans
        drop_rate = cfg.drop_rate if drop_rate is None else drop_rate
        drop_path_rate = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        pool = self._head_pool(cfg.head["pool"] if global_pool is None else global_pool)
        # create_model's keyword arguments, checked by the rules of the config keys they override
        for key, v in (("num_classes", self.num_classes), ("in_chans", self.in_chans),
                       ("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
            kinds, _, check, rule = MODEL_OVERRIDES[key]
            problem = value_problem(v, kinds, check, rule)
            if problem:
                raise ValueError(f"{cfg.name}: {key}: {problem}")
        # timm's device/dtype: build there (device='meta' allocates nothing), then cast
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self._build(cfg, drop_rate, drop_path_rate, pool)
        if dtype is not None:
            self.to(dtype=dtype)

    def _build(self, cfg: ModelConfig, drop_rate: float, drop_path_rate: float, pool: str) -> None:
        self.stem = build("stem", cfg.stem, in_chans=self.in_chans, out_dim=cfg.stages[0].dim)
        total = sum(s.depth for s in cfg.stages)
        # Plain floats, not torch.linspace: models are also built on the meta device to be measured.
        rates = [drop_path_rate * i / (total - 1) for i in range(total)] if total > 1 else [0.0] * total
        # A stem may set its own width (``width`` key, e.g. MaxViT's 64 channels before 96-wide stages).
        stages, in_dim, start = [], cfg.stem.get("width") or cfg.stages[0].dim, 0
        self.feature_info = []
        for i, s in enumerate(cfg.stages):
            stages.append(Stage(s, in_dim, rates[start:start + s.depth]))
            start += s.depth
            in_dim = s.dim
            self.feature_info.append(dict(num_chs=s.dim, reduction=s.reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = cfg.num_features
        self.norm = build("norm", cfg.norm, dim=self.num_features) or nn.Identity()
        self.norm_layout = getattr(self.norm, "layout", NCHW)
        head = cfg.head
        if head["norm"] is not None or head["hidden_size"]:
            norm_spec = dict(head["norm"] or {"type": "layernorm2d"})
            norm_cls = lookup("norm", norm_spec.pop("type"))

            def head_norm(dim, device=None, dtype=None):  # timm passes device/dtype; zoo norms take neither
                return norm_cls(dim, **norm_spec).to(device=device, dtype=dtype)

            self.head = NormMlpClassifierHead(
                self.num_features, self.num_classes, hidden_size=head["hidden_size"], pool_type=pool,
                drop_rate=drop_rate, norm_layer=head_norm, act_layer=head["hidden_act"])
        else:
            self.head = ClassifierHead(self.num_features, self.num_classes, pool_type=pool, drop_rate=drop_rate)
        self.head_hidden_size = self.head.num_features
        self.output_fmt = "NCHW"
        self.apply(_init_weights)

    # ------------------------------------------------------------------ forward

    def _run_stages(self, x: torch.Tensor, stages=None):
        """Yield (index, NCHW-or-native tensor, layout) after each stage."""
        layout = self.stem.layout
        for i, stage in enumerate(self.stages if stages is None else stages):
            x = to_layout(x, layout, stage.in_layout)
            x = stage(x)
            layout = stage.out_layout
            yield i, x, layout

    def _final_norm(self, x: torch.Tensor, layout: str) -> torch.Tensor:
        x = to_layout(x, layout, self.norm_layout)
        return to_layout(self.norm(x), self.norm_layout, NCHW)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> final feature map (B, C, H/32, W/32), after the final norm."""
        check_image_batch(x, self.cfg.name, self.in_chans)
        x = self.stem(x)
        layout = self.stem.layout
        for _, x, layout in self._run_stages(x):
            pass
        return self._final_norm(x, layout)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled logits (B, classes); with ``global_pool=''`` logits at every position of the map,
        (B, classes, H, W), as timm's conv-headed models give them."""
        if self.dense_head:
            B, C, H, W = x.shape
            x = self.head(x.permute(0, 2, 3, 1).reshape(B * H * W, C, 1, 1), pre_logits=pre_logits)
            return x.reshape(B, H, W, -1).permute(0, 3, 1, 2)
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Per-stage feature maps (strides 4, 8, 16, 32 for four stages), timm's contract."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        check_image_batch(x, self.cfg.name, self.in_chans)
        take, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if (stop_early or intermediates_only) else self.stages
        x = self.stem(x)
        layout = self.stem.layout
        feats = []
        for i, x, layout in self._run_stages(x, stages):
            if i in take:
                y = self._final_norm(x, layout) if (norm and i == last) else to_layout(x, layout, NCHW)
                feats.append(y if output_fmt == "NCHW" else y.permute(0, 2, 3, 1))
        if intermediates_only:
            return feats
        # After the last stage the final norm; after an early stop the stage output, NCHW either way.
        x = self._final_norm(x, layout) if i == last else to_layout(x, layout, NCHW)
        return x, feats

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """Keep the stages up to the last of ``indices`` (timm's contract). Ending before the last
        stage also drops the final norm and the head (both sized for the last stage) and makes
        ``num_features`` the kept stage's width; a pruned head is timm's with ``reset_other``: no
        classifier, no pooling, no norm or hidden layer."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
            self.norm_layout = NCHW
        if prune_end:
            self.num_features = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.head = self._like_model(ClassifierHead(self.num_features, 0, drop_rate=self.head.drop.p))
            self.reset_classifier(0, "")
        return take

    # ------------------------------------------------------------------ timm API

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        pool = None if global_pool is None else self._head_pool(global_pool)
        self.num_classes = num_classes
        self.head.reset(num_classes, pool)
        self._like_model(self.head)  # a new classifier on the model's device, in its dtype
        self.head_hidden_size = self.head.num_features

    def _like_model(self, module: nn.Module) -> nn.Module:
        ref = next(self.stem.parameters())
        return module.to(device=ref.device, dtype=ref.dtype)

    def _head_pool(self, global_pool: str) -> str:
        """Check timm's ``global_pool`` by the config's rule and return the head's pooling.
        ``''`` (no pooling) sets ``dense_head``: the head then runs at every position of the final
        map with the pooled head's parameters (so pretrained weights load), built to pool a 1x1
        map, where any pooling is the identity."""
        head = self.cfg.head
        problem = pool_problem(global_pool, head["norm"] is not None or bool(head["hidden_size"]))
        if problem:
            raise ValueError(f"{self.cfg.name}: global_pool: {problem}")
        self.dense_head = global_pool == ""
        self.global_pool = global_pool  # as given (timm's attribute; save_pretrained records it)
        return global_pool or "avg"

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, which also takes the original checkpoint layouts (timm's, the authors'):
        a strict load of keys that are not all the zoo's goes through the converter that
        ``pretrained=True`` uses (so timm's ``checkpoint_path=`` and ``load_checkpoint`` take an
        original checkpoint; one that does not fit says which keys are wrong). Any load that
        nn.Module would accept is left to it unchanged."""
        if strict and not set(state_dict) <= set(self.state_dict()):
            from zoo.convert import convert_checkpoint  # the converters import zoo's model code
            state_dict = convert_checkpoint(state_dict, self)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first, on this model or on any wrapper that holds it."""
        raise RuntimeError(
            f"{self.cfg.name}: TorchScript (torch.jit.script) is not supported: zoo's blocks pick "
            f"windows and padding per input size in Python, and PyTorch deprecates TorchScript. Use "
            f"torch.compile, torch.export (zoo.export.export_program) or ONNX (zoo.export.export_onnx).")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        names = set()
        for mod_name, mod in self.named_modules():
            for p in getattr(mod, "no_weight_decay_names", ()):
                if getattr(mod, p, None) is not None:
                    names.add(f"{mod_name}.{p}" if mod_name else p)
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layers for timm's layer-wise lr decay: one per repetition of a stage's unit (a block for
        most families; MaxViT's MBConv, block and grid attention together), as the papers count
        depth; ``coarse``: one per stage."""
        if coarse:
            return dict(stem=r"^stem", blocks=r"^stages\.(\d+)")
        units = [(rf"^stages\.{i}\.blocks\.{j}\.", (i, u))
                 for i, stage in enumerate(self.stages) if stage.block_units != list(range(len(stage.blocks)))
                 for j, u in enumerate(stage.block_units)]
        return dict(stem=r"^stem", blocks=[
            (r"^stages\.(\d+)\.(?:downsample|context)", (0,)),
            *units,
            (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^norm", (99999,)),
        ])


def _init_weights(m: nn.Module) -> None:
    """ViT-style default for linears (the NAT, Swin and most authors' codes); modules with their own
    scheme define ``init_weights`` and are left to it."""
    if hasattr(m, "init_weights") and not isinstance(m, Backbone):
        m.init_weights()
    elif isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
