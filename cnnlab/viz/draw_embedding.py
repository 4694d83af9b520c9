"""The kind `embedding`: penultimate features of test images in 2-D, by PCA and by t-SNE (van der
Maaten & Hinton 2008; scikit-learn's), coloured by class, and the t-SNE map drawn with the images
themselves at their positions (Karpathy's CNN-codes t-SNE pictures)."""

from typing import Any

import numpy as np

from cnnlab.viz.common import kind
from cnnlab.viz.network import Network, Restored
from cnnlab.viz.options import VizOptions
from cnnlab.viz.output import Output


def project(features: np.ndarray, perplexity: float, seed: int) -> dict[str, np.ndarray]:
    """{"pca": (N, 2), "tsne": (N, 2)} of (N, D) features."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    features = np.asarray(features, np.float64)
    pca = PCA(n_components=2, random_state=seed).fit_transform(features)
    # t-SNE needs perplexity < N; PCA initialization makes the layout stable across seeds.
    tsne = TSNE(n_components=2, perplexity=min(perplexity, (len(features) - 1) / 3),
                init="pca", random_state=seed).fit_transform(features)
    return {"pca": pca, "tsne": tsne}


def _scatter(points: np.ndarray, labels: np.ndarray, names: list[str], title: str) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5), layout="constrained")
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for c, name in enumerate(names):
        mask = labels == c
        if mask.any():
            ax.scatter(*points[mask].T, s=4, color=cmap(c % cmap.N), label=name)
    if len(names) <= 20:
        ax.legend(fontsize=6, markerscale=3, loc="best")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def _thumbnails(points: np.ndarray, images: np.ndarray, labels: np.ndarray, count: int,
                seed: int, title: str) -> Any:
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    fig, ax = plt.subplots(figsize=(8, 8), layout="constrained")
    cmap = plt.get_cmap("tab10")
    ax.scatter(*points.T, s=1, color="lightgrey")
    chosen = np.random.default_rng(seed).permutation(len(points))[:count]
    grey = images.shape[-1] == 1
    for i in chosen:
        picture = images[i, ..., 0] if grey else images[i]
        box = OffsetImage(picture, zoom=0.8, cmap="gray" if grey else None)
        ax.add_artist(AnnotationBbox(box, points[i], frameon=True, pad=0.05,
                                     bboxprops={"edgecolor": cmap(labels[i] % 10)}))
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


@kind("embedding")
def draw(restored: Restored, options: VizOptions, out: Output) -> None:
    test = restored.dataset.test
    count = len(test) if options.points is None else min(options.points, len(test))
    indices = np.sort(np.random.default_rng(options.seed).permutation(len(test))[:count])
    features = np.asarray(restored.network.map_batches(Network.features, test.images[indices]))
    layouts = project(features, options.perplexity, options.seed)
    labels, names = test.labels[indices], restored.class_names
    what = f"penultimate features ({features.shape[1]}-D) of {count:,} test images"
    out.figure(_scatter(layouts["pca"], labels, names, f"PCA of {what}"), "embedding_pca")
    out.figure(_scatter(layouts["tsne"], labels, names,
                        f"t-SNE (perplexity {options.perplexity:g}) of {what}"),
               "embedding_tsne")
    out.figure(_thumbnails(layouts["tsne"], test.images[indices], labels, options.thumbnails,
                           options.seed, f"t-SNE of {what}, {options.thumbnails} drawn"),
               "embedding_thumbnails")
    out.arrays(indices=indices, labels=labels, **layouts)
