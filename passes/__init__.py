"""Compression passes, one module per family. Importing this package registers them by name."""

from .binarization import Binarize, QuantConv2d, QuantLinear, inq_schedule
from .binary_survey import bipolar_regularizer, clip_latent, tang_config
from .channel_pruning import ChannelPruning, iterative_prune, slimming_penalty
from .clustering import WeightClustering, kmeans_1d
from .deep_kmeans import DeepKMeans
from .hashed import HashedNets
from .learned_sharing import GaussianMixturePrior, TrainedClustering
from .low_bit_survey import LocalBinaryConv, admm_config
from .low_rank import LowRankSplit
from .rank_training import RankTraining
from .quantization import FakeQuantConv2d, FakeQuantLinear, Quantize, fold_batchnorm
from .soft_filter_pruning import SoftFilterPruning, SoftPruner
from .sparse_training import TrainedSparsity
from .sparsity import MaskedConv2d, MaskedLinear, Sparsify, agp_callback, dns_callback
from .sketching import NetworkSketching
from .ssl import GroupLasso, StructuredSparsity
from .two_step import TwoStepQuantization

__all__ = ["Binarize", "ChannelPruning", "FakeQuantConv2d", "FakeQuantLinear", "LowRankSplit", "MaskedConv2d", "MaskedLinear", "QuantConv2d", "QuantLinear", "Quantize",
           "Sparsify", "WeightClustering", "agp_callback", "dns_callback", "inq_schedule", "iterative_prune",
           "fold_batchnorm", "kmeans_1d", "slimming_penalty", "GroupLasso", "SoftFilterPruning", "SoftPruner",
           "StructuredSparsity", "GaussianMixturePrior", "TrainedClustering", "TrainedSparsity",
           "NetworkSketching", "bipolar_regularizer", "clip_latent", "tang_config",
           "DeepKMeans", "HashedNets", "RankTraining",
           "LocalBinaryConv", "TwoStepQuantization", "admm_config"]
