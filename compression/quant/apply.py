"""Run a Flax model's own ``apply`` with compressed parameters: one mechanism for every container.

`compressed_apply(apply_fn)` turns ``apply_fn(params, *args, **kw)`` (e.g. ``model.forward``)
into ``f(cparams, *args, **kw)`` for a tree with compressed leaves (`feynkit.compression.protocol`):

* every ``nn.Dense`` whose kernel is compressed is computed by the container's own matmul,
  y = leaf.matmul(x) + bias (a Flax method interceptor), so activation-quantizing containers
  (SmoothQuant, SVDQuant W4A4) round the activations the layer actually sees;
* every ``nn.Conv`` whose kernel quantizes activations is computed the same way on im2col
  patches, y = leaf.matmul(patches(x)) + bias (`conv_patches` has the layout of the kernel's
  reshape to (kh·kw·c_in, c_out));
* every other compressed leaf (weight-only Conv kernels, embeddings, norms, ...) is dequantized
  on use: the model reads ``leaf.dequantize()``, which under the caller's ``jit`` XLA fuses into
  the consuming op.

An activation-quantizing leaf that no Dense/Conv call consumed raises a ValueError (its
activation rounding would otherwise be skipped silently).

References:
  Flax ``nn.intercept_methods``; Frantar et al. (2023), "GPTQ" (dequantize-on-use kernels).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding
from jax import lax

from feynkit.compression.protocol import is_compressed
from feynkit.compression.quant.tree import dequantize_tree, path_str
from feynkit.core.types import Array, PyTree

__all__ = ["compressed_apply", "conv_patches", "layer_inputs", "quantized_apply"]


def _broadcast(v, n: int) -> tuple[int, ...]:
    v = 1 if v is None else v
    return (v,) * n if isinstance(v, int) else tuple(v)


def conv_patches(module: nn.Conv, x: Array) -> tuple[Array, tuple[int, ...]]:
    """im2col patches of a Flax ``nn.Conv`` input, in the order of its kernel's reshape.

    conv(x, W) = patches(x) @ W.reshape(kh·kw·c_in, c_out) with the patch features ordered
    (spatial offset, input channel), as the (kh, kw, c_in, c_out) kernel flattens.

    Args:
      module: the (bound or unbound) Conv; its strides, padding, dilations are used.
      x: the Conv's input (*batch, *spatial, c_in).

    Returns:
      (patches of shape (B, *out_spatial, kh·kw·c_in), the input's batch shape); B is the
      flattened batch.

    Raises:
      ValueError: grouped, unshared (ConvLocal) or masked convolutions.
    """
    ks = (module.kernel_size,) if isinstance(module.kernel_size, int) else module.kernel_size
    ks = tuple(ks)
    if module.feature_group_count != 1 or not module.shared_weights or module.mask is not None:
        raise ValueError(
            f"conv {'/'.join(module.path)}: im2col serves plain convolutions only "
            "(feature_group_count=1, shared weights, no mask); keep this kernel in float or "
            "compress it with a weight-only method."
        )
    nb = x.ndim - (len(ks) + 1)
    batch_shape = x.shape[:nb]
    x = x.reshape((-1,) + x.shape[nb:])
    strides = _broadcast(module.strides, len(ks))
    in_dil = _broadcast(module.input_dilation, len(ks))
    k_dil = _broadcast(module.kernel_dilation, len(ks))
    padding = canonicalize_padding(module.padding, len(ks))
    if padding in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(ks, k_dil, strict=True)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
        padding = "VALID"
    elif padding == "CAUSAL":
        x = jnp.pad(x, [(0, 0), (k_dil[0] * (ks[0] - 1), 0), (0, 0)])
        padding = "VALID"
    nd = x.ndim
    spec = (0, nd - 1) + tuple(range(1, nd - 1))
    dn = lax.ConvDimensionNumbers(spec, (nd - 1, nd - 2) + tuple(range(nd - 2)), spec)
    p = lax.conv_general_dilated_patches(
        x,
        ks,
        strides,
        padding,
        lhs_dilation=in_dil,
        rhs_dilation=k_dil,
        dimension_numbers=dn,
        precision=lax.Precision.HIGHEST,
    )
    c_in, k = x.shape[-1], p.shape[-1] // x.shape[-1]
    p = jnp.swapaxes(p.reshape(p.shape[:-1] + (c_in, k)), -1, -2).reshape(p.shape)
    return p, batch_shape


def layer_inputs(module: nn.Module, x: Array) -> Array | None:
    """The rows the kernel of a Dense or Conv multiplies, (rows, d_in); None for other modules.

    Dense: x.reshape(−1, d_in); Conv: `conv_patches` rows (one per output position).
    """
    if isinstance(module, nn.Dense):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv):
        p, _ = conv_patches(module, x)
        return p.reshape(-1, p.shape[-1])
    return None


def _bias(module, dtype):
    if not getattr(module, "use_bias", False):
        return None
    return jnp.asarray(module.get_variable("params", "bias"), dtype)


def _compute_dtype(module, x, leaf):
    return module.dtype or jnp.result_type(x.dtype, leaf.dtype)


def _dense(module: nn.Dense, leaf, x):
    dtype = _compute_dtype(module, x, leaf)
    y = leaf.matmul(jnp.asarray(x, dtype)).astype(dtype)
    b = _bias(module, dtype)
    return y if b is None else y + b.reshape((1,) * (y.ndim - 1) + (-1,))


def _conv(module: nn.Conv, leaf, x):
    dtype = _compute_dtype(module, x, leaf)
    p, batch_shape = conv_patches(module, jnp.asarray(x, dtype))
    y = leaf.matmul(p).astype(dtype)
    b = _bias(module, dtype)
    y = y if b is None else y + b.reshape((1,) * (y.ndim - 1) + (-1,))
    return y.reshape(batch_shape + y.shape[1:])


def _kernel_of(module, compressed: dict):
    base = "/".join(module.path) + "/kernel"
    for path in (base, "params/" + base):
        if path in compressed:
            return path, compressed[path]
    return None, None


def compressed_apply(
    apply_fn: Callable[..., object], *, intercept: bool = True
) -> Callable[..., object]:
    """``apply_fn(params, *args, **kw)`` → ``f(cparams, *args, **kw)`` for compressed trees.

    Dense kernels are served by their container's ``matmul``, Conv kernels that quantize
    activations by ``matmul`` on im2col patches, every other compressed leaf is dequantized on
    use (see the module docstring). E.g. ``jax.jit(compressed_apply(unet.forward))(cparams, x,
    t, label)`` or ``compressed_apply(lm.forward)(cparams, tokens)``.

    Args:
      apply_fn: a function of (params, ...) that runs a Flax model, e.g. ``model.forward`` or
        ``lambda p, x: model.apply({"params": p}, x)``; also accepts float trees.
      intercept: False dequantizes every leaf instead (pure dequantize-on-use; refused when
        some leaf quantizes activations).

    Returns:
      The wrapped function, pure and jit-able (compressed leaves are pytree arguments).

    Raises:
      ValueError: (when called) an activation-quantizing leaf that no Dense/Conv consumed, or
        any activation-quantizing leaf with ``intercept=False``.
    """

    def apply(params: PyTree, *args, **kwargs):
        leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_compressed)[0]
        compressed = {path_str(p): x for p, x in leaves if is_compressed(x)}
        acting = sorted(p for p, x in compressed.items() if x.quantizes_activations)
        dense = dequantize_tree(params)
        if not intercept:
            if acting:
                raise ValueError(
                    f"compressed_apply(intercept=False): {acting[:4]} quantize activations, "
                    "which only their matmul does; use intercept=True."
                )
            return apply_fn(dense, *args, **kwargs)
        served: set[str] = set()

        def interceptor(next_fun, call_args, call_kwargs, context):
            module = context.module
            if context.method_name != "__call__" or not call_args:
                return next_fun(*call_args, **call_kwargs)
            is_dense, is_conv = isinstance(module, nn.Dense), isinstance(module, nn.Conv)
            if not (is_dense or is_conv):
                return next_fun(*call_args, **call_kwargs)
            path, leaf = _kernel_of(module, compressed)
            if leaf is None or (is_conv and not leaf.quantizes_activations):
                return next_fun(*call_args, **call_kwargs)
            served.add(path)
            return (_dense if is_dense else _conv)(module, leaf, call_args[0])

        with nn.intercept_methods(interceptor):
            out = apply_fn(dense, *args, **kwargs)
        unserved = [p for p in acting if p not in served]
        if unserved:
            raise ValueError(
                f"{unserved[:4]} quantize activations but no nn.Dense/nn.Conv with that kernel "
                "path ran (paths are '<module path>/kernel'); compress only Dense/Conv kernels "
                "with activation-quantizing recipes, or check apply_fn takes the params tree."
            )
        return out

    return apply


quantized_apply = compressed_apply
"""Alias of `compressed_apply`."""
