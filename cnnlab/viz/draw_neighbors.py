"""The kind `neighbors`: for a few test images, the nearest training images by L2 distance in the
penultimate feature space (what the classifier reads) beside the nearest in pixel space
(Krizhevsky et al. 2012, Figure 4)."""

import jax
import numpy as np

from cnnlab.viz import figures
from cnnlab.viz.common import image_indices, kind
from cnnlab.viz.neighbors import nearest
from cnnlab.viz.network import Network, Restored
from cnnlab.viz.options import VizOptions
from cnnlab.viz.output import Output


@kind("neighbors", splits=("train", "test"))
def draw(restored: Restored, options: VizOptions, out: Output) -> None:
    network, data = restored.network, restored.dataset
    indices = image_indices(options, len(data.test))
    base = data.train.images[:options.search]
    queries = data.test.images[indices]
    k = min(options.k, len(base))
    find = jax.jit(nearest, static_argnames=("k",))
    base_features = network.map_batches(Network.features, base)
    query_features = network.map_batches(Network.features, queries)
    by_feature = [np.asarray(a) for a in find(query_features, base_features, k=k)]
    by_pixel = [np.asarray(a) for a in find(queries, base, k=k)]
    names, labels = restored.class_names, data.train.labels
    rows, titles = [], []
    for q, index in enumerate(indices):
        rows.append([queries[q] / 255.0] + [base[i] / 255.0 for i in by_feature[1][q]]
                    + [base[i] / 255.0 for i in by_pixel[1][q]])
        titles.append([names[data.test.labels[index]]]
                      + [names[labels[i]] for i in by_feature[1][q]]
                      + [names[labels[i]] for i in by_pixel[1][q]])
    fig = figures.rows_figure(rows, [f"test {i}" for i in indices], titles, cell=0.9,
                              suptitle=f"left: test image; then its {k} nearest of "
                              f"{len(base):,} training images in penultimate-feature space; "
                              f"then the {k} nearest in pixel space")
    out.figure(fig)
    out.arrays(indices=indices, feature_neighbors=by_feature[1], feature_d2=by_feature[0],
               pixel_neighbors=by_pixel[1], pixel_d2=by_pixel[0])
