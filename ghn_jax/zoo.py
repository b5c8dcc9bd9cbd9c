"""Model zoo: standard architectures in Flax linen, for GHN evaluation.

The models use standard Flax layers (`nn.Conv`, `nn.Dense`, `nn.BatchNorm`
with batch statistics, `nn.LayerNorm`, `nn.MultiHeadDotProductAttention`)
so they exercise the graph builder on ordinary Flax code. Parameter shapes
match the torchvision models they mirror (ResNet-18 for 10 classes has
11,173,962 parameters, as in torchvision). Inputs are NHWC.

`cifar=True` applies the adjustment the original GHN-2 code makes to
torchvision models for 32x32 images (ppuda's `adjust_net`): a 3x3 stride-1
stem convolution and no stem max pooling.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's BatchNorm2d momentum (0.1) and epsilon, in Flax's convention.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
# torchvision's ConvNeXt uses LayerNorm epsilon 1e-6 and layer scale 1e-6.
CONVNEXT_LN_EPSILON = 1e-6
CONVNEXT_LAYER_SCALE = 1e-6
CIFAR_INPUT_SHAPE = (1, 32, 32, 3)
IMAGENET_INPUT_SHAPE = (1, 224, 224, 3)


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    name=name,
  )


def _conv(features: int, kernel: int, stride: int = 1, **kwargs) -> nn.Conv:
  """Make a PyTorch-style conv: symmetric padding kernel // 2, no bias."""
  pad = kernel // 2
  kwargs.setdefault("use_bias", False)
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    **kwargs,
  )


class BasicBlock(nn.Module):
  """ResNet basic block (two 3x3 convs), torchvision layout."""

  planes: int
  stride: int = 1
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = True):
    identity = x
    y = _conv(self.planes, 3, self.stride, name="conv1")(x)
    y = nn.relu(_batch_norm(train, "bn1")(y))
    y = _conv(self.planes, 3, name="conv2")(y)
    y = _batch_norm(train, "bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.planes:
      identity = _conv(self.planes, 1, self.stride, name="downsample_conv")(x)
      identity = _batch_norm(train, "downsample_bn")(identity)
    return nn.relu(y + identity)


class Bottleneck(nn.Module):
  """ResNet bottleneck block (1x1, 3x3, 1x1), torchvision layout."""

  planes: int
  stride: int = 1
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = True):
    out_planes = self.planes * self.expansion
    identity = x
    y = _conv(self.planes, 1, name="conv1")(x)
    y = nn.relu(_batch_norm(train, "bn1")(y))
    y = _conv(self.planes, 3, self.stride, name="conv2")(y)
    y = nn.relu(_batch_norm(train, "bn2")(y))
    y = _conv(out_planes, 1, name="conv3")(y)
    y = _batch_norm(train, "bn3")(y)
    if self.stride != 1 or x.shape[-1] != out_planes:
      identity = _conv(out_planes, 1, self.stride, name="downsample_conv")(x)
      identity = _batch_norm(train, "downsample_bn")(identity)
    return nn.relu(y + identity)


class ResNet(nn.Module):
  """torchvision's ResNet; `cifar=True` applies the 32x32 adjustment."""

  block: type[nn.Module]
  layers: Sequence[int]
  num_classes: int = 10
  cifar: bool = True

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.cifar:
      x = _conv(64, 3, name="conv1")(x)
    else:
      x = _conv(64, 7, 2, name="conv1")(x)
    x = nn.relu(_batch_norm(train, "bn1")(x))
    if not self.cifar:
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.layers):
      planes = 64 * 2**stage
      for i in range(num_blocks):
        stride = 2 if (stage > 0 and i == 0) else 1
        name = f"layer{stage + 1}_{i}"
        x = self.block(planes, stride, name=name)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


class MLP(nn.Module):
  """A multilayer perceptron on flattened inputs."""

  hidden: Sequence[int] = (512, 256)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"fc{i}")(x))
    return nn.Dense(self.num_classes, name="classifier")(x)


class MobileNet(nn.Module):
  """MobileNet (v1): depthwise-separable convolutions with batch norm."""

  num_classes: int = 10
  cifar: bool = True
  # (out_channels, stride) of each depthwise-separable block.
  blocks: Sequence[tuple[int, int]] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
  )

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = _conv(32, 3, 1 if self.cifar else 2, name="stem_conv")(x)
    x = nn.relu(_batch_norm(train, "stem_bn")(x))
    for i, (features, stride) in enumerate(self.blocks):
      channels = x.shape[-1]
      x = _conv(
        channels, 3, stride, feature_group_count=channels, name=f"dw{i}"
      )(x)
      x = nn.relu(_batch_norm(train, f"dw{i}_bn")(x))
      x = _conv(features, 1, name=f"pw{i}")(x)
      x = nn.relu(_batch_norm(train, f"pw{i}_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="classifier")(x)


class ConvNeXtBlock(nn.Module):
  """ConvNeXt block: 7x7 depthwise conv, LN, MLP, layer scale, residual."""

  dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(
      self.dim,
      (7, 7),
      padding=((3, 3), (3, 3)),
      feature_group_count=self.dim,
      name="dwconv",
    )(x)
    y = nn.LayerNorm(epsilon=CONVNEXT_LN_EPSILON, name="norm")(y)
    y = nn.gelu(nn.Dense(4 * self.dim, name="pwconv1")(y), approximate=False)
    y = nn.Dense(self.dim, name="pwconv2")(y)
    gamma = self.param(
      "layer_scale",
      nn.initializers.constant(CONVNEXT_LAYER_SCALE),
      (self.dim,),
    )
    return x + gamma * y


class ConvNeXt(nn.Module):
  """torchvision's ConvNeXt (tiny by default), without stochastic depth."""

  depths: Sequence[int] = (3, 3, 9, 3)
  dims: Sequence[int] = (96, 192, 384, 768)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = nn.Conv(self.dims[0], (4, 4), strides=(4, 4), name="stem_conv")(x)
    x = nn.LayerNorm(epsilon=CONVNEXT_LN_EPSILON, name="stem_norm")(x)
    for stage, (depth, dim) in enumerate(
      zip(self.depths, self.dims, strict=True)
    ):
      if stage > 0:
        x = nn.LayerNorm(epsilon=CONVNEXT_LN_EPSILON, name=f"down{stage}_norm")(
          x
        )
        x = nn.Conv(dim, (2, 2), strides=(2, 2), name=f"down{stage}_conv")(x)
      for i in range(depth):
        x = ConvNeXtBlock(dim, name=f"stage{stage}_{i}")(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.LayerNorm(epsilon=CONVNEXT_LN_EPSILON, name="head_norm")(x)
    return nn.Dense(self.num_classes, name="classifier")(x)


class ViTBlock(nn.Module):
  """Pre-norm transformer block: attention and MLP with residuals."""

  dim: int
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads, name="attention"
    )(y, y)
    x = x + y
    y = nn.LayerNorm(name="ln2")(x)
    y = nn.gelu(nn.Dense(self.mlp_dim, name="mlp1")(y), approximate=False)
    return x + nn.Dense(self.dim, name="mlp2")(y)


class ViT(nn.Module):
  """A small vision transformer: patch conv, positional encoding, blocks."""

  patch_size: int = 4
  dim: int = 128
  depth: int = 6
  num_heads: int = 8
  mlp_dim: int = 256
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    p = self.patch_size
    x = nn.Conv(self.dim, (p, p), strides=(p, p), name="patch_embed")(x)
    _, height, width, _ = x.shape
    pos = self.param(
      "pos_embedding",
      nn.initializers.normal(0.02),
      (1, height, width, self.dim),
    )
    x = (x + pos).reshape(x.shape[0], height * width, self.dim)
    for i in range(self.depth):
      x = ViTBlock(self.dim, self.num_heads, self.mlp_dim, name=f"block{i}")(x)
    x = nn.LayerNorm(name="ln_final")(x)
    x = jnp.mean(x, axis=1)
    return nn.Dense(self.num_classes, name="classifier")(x)


@dataclasses.dataclass(frozen=True)
class ZooEntry:
  """A zoo model: how to build it and the input shape it expects."""

  make: Callable[..., nn.Module]
  input_shape: tuple[int, ...] = CIFAR_INPUT_SHAPE


def _darts(num_classes: int = 10, imagenet: bool = False) -> nn.Module:
  """Make the DARTS network of the DeepNets-1M package (DARTS genotype).

  36 channels and 20 cells for CIFAR, 48 channels, 14 cells and the DARTS
  stem for ImageNet, as in the original's `examples/darts.py`.
  """
  from ghn_jax.deepnets1m import net, sampler  # Imported on use.

  config = sampler.predefined_configs(imagenet_input=imagenet)["DARTS"]
  return net.Network(config.replace(num_classes=num_classes))


ZOO: dict[str, ZooEntry] = {
  "resnet18": ZooEntry(lambda **kw: ResNet(BasicBlock, (2, 2, 2, 2), **kw)),
  "resnet34": ZooEntry(lambda **kw: ResNet(BasicBlock, (3, 4, 6, 3), **kw)),
  "resnet50": ZooEntry(lambda **kw: ResNet(Bottleneck, (3, 4, 6, 3), **kw)),
  "resnet50_imagenet": ZooEntry(
    lambda **kw: ResNet(Bottleneck, (3, 4, 6, 3), cifar=False, **kw),
    IMAGENET_INPUT_SHAPE,
  ),
  "resnet18_imagenet": ZooEntry(
    lambda **kw: ResNet(BasicBlock, (2, 2, 2, 2), cifar=False, **kw),
    IMAGENET_INPUT_SHAPE,
  ),
  "vit": ZooEntry(lambda **kw: ViT(**kw)),
  "mlp": ZooEntry(lambda **kw: MLP(**kw)),
  "mobilenet": ZooEntry(lambda **kw: MobileNet(**kw)),
  "convnext_tiny": ZooEntry(lambda **kw: ConvNeXt(**kw)),
  "darts": ZooEntry(_darts),
  "darts_imagenet": ZooEntry(
    lambda **kw: _darts(imagenet=True, **kw), IMAGENET_INPUT_SHAPE
  ),
}


def create_model(
  name: str, num_classes: int = 10
) -> tuple[nn.Module, tuple[int, ...]]:
  """Return a zoo model and its input shape (batch of 1, NHWC).

  Raises:
    ValueError: if `name` is not in `ZOO`.
  """
  if name not in ZOO:
    raise ValueError(f"Unknown zoo model {name!r}; choose from {sorted(ZOO)}.")
  entry = ZOO[name]
  return entry.make(num_classes=num_classes), entry.input_shape


def count_params(model: nn.Module, input_shape: Sequence[int]) -> int:
  """Return the number of parameter values of `model` (abstract init)."""
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  return sum(
    math.prod(leaf.shape)
    for leaf in jax.tree_util.tree_leaves(variables["params"])
  )
