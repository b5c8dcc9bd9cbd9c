"""ghn_jax: Graph HyperNetworks (GHN-2) in JAX and Flax.

A GHN reads the computational graph of a network and predicts all of that
network's parameters in one forward pass:

  import jax
  import ghn_jax

  model, input_shape = ghn_jax.create_model("resnet50")
  graph = ghn_jax.build_graph(model, input_shape=input_shape)
  ghn, ghn_params = ghn_jax.load_ghn("ghn2_cifar10.npz")
  params = ghn_jax.predict_params(ghn, ghn_params, graph)

Names are imported on first use, so `import ghn_jax` stays cheap and the
architecture sampler's worker processes do not load JAX.
"""

import importlib

__version__ = "0.1.0"

# Public name -> submodule that defines it.
_EXPORTS = {
  # Graphs of networks.
  "Graph": "graph",
  "PRIMITIVES": "graph",
  "DEFAULT_VIRTUAL_EDGE_CUTOFF": "graph",
  "virtual_edges": "graph",
  "save_graph": "graph",
  "load_graph": "graph",
  "build_graph": "graph_builder",
  "build_graph_with_report": "graph_builder",
  "GraphReport": "graph_builder",
  "UnsupportedLayerWarning": "graph_builder",
  "clear_cache": "graph_builder",
  "build_deepnets_graph": "graph_deepnets",
  "graph_to_graphs_tuple": "jraph_utils",
  "graphs_to_padded_batch": "jraph_utils",
  "plot_graph": "plot_graph",
  "create_model": "zoo",
  # The graph hypernetwork.
  "GHN": "ghn",
  "GHNConfig": "ghn",
  "ghn2_config": "ghn",
  "ghn2_imagenet_config": "ghn",
  "ghn1_config": "ghn",
  "mlp_ghn_config": "ghn",
  "init_ghn": "ghn",
  "prepare_inputs": "ghn",
  "apply_jit": "ghn",
  "predict_params": "ghn",
  "predict_params_batch": "ghn",
  "assemble_params": "ghn",
  "node_embeddings": "ghn",
  "save_ghn": "ghn",
  "load_ghn": "ghn",
  "load_torch_ghn": "checkpoint_import",
  "convert_checkpoint": "checkpoint_import",
  # Meta-training and data.
  "train_and_evaluate": "train",
  "TrainState": "train",
  "load_fashion_mnist": "data",
  # Evaluation of predicted parameters.
  "evaluate_networks": "evaluate",
  "EvalConfig": "evaluate",
  "SgdConfig": "evaluate",
  "sgd_steps_equivalent": "evaluate",
  "compare_finetuning": "evaluate",
  # DeepNets-1M architectures.
  "Network": "deepnets1m",
  "NetConfig": "deepnets1m",
  "config_from_net_args": "deepnets1m",
  "Genotype": "deepnets1m",
  "DARTS": "deepnets1m",
  "PDARTS": "deepnets1m",
  "VIT": "deepnets1m",
  "count_params": "deepnets1m",
  "param_specs": "deepnets1m",
  "abstract_params": "deepnets1m",
}
_SUBMODULES = (
  "nn_ops",
  "deepnets1m",
  "graph",
  "graph_builder",
  "ghn",
  "zoo",
  "train",
  "data",
  "evaluate",
)

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
  return getattr(module, name)
