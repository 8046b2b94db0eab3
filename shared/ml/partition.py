"""Non-IID partitions of a labelled set, made with flwr-datasets' partitioners."""

import numpy as np

PARTITION_SEED = 42


def dirichlet_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int = PARTITION_SEED
) -> list[np.ndarray]:
    """Split example indices into ``num_partitions`` label-skewed parts.

    flwr-datasets' ``DirichletPartitioner`` draws each class's share per
    partition from Dir(alpha); small alpha means more skew. It works on a
    Hugging Face ``Dataset``, built here in memory from the labels (nothing is
    downloaded). Every partition gets at least a few examples: at most 10 and
    at most half the mean partition size (a minimum equal to the mean size
    can only be met by an exactly even split, which Dirichlet draws never give).
    ``seed`` fixes the draw: the same seed gives every site the same split.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    table = Dataset.from_dict({"label": labels.tolist(), "index": list(range(len(labels)))})
    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min(10, len(labels) // (2 * max(num_partitions, 1))),
        self_balancing=True,
        seed=seed,
    )
    partitioner.dataset = table
    return [
        np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
        for i in range(num_partitions)
    ]
