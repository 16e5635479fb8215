"""The 11 datasets of MTIL (multi-domain task-incremental learning; ZSCL, Zheng et al. 2023), as KeepLoRA uses them.

Registry names: aircraft, caltech101, cifar100, dtd, eurosat, flowers102, food101, mnist, oxford_pets,
stanford_cars, sun397. Each loads through torchvision with the spec's `root` and `download`; `root` is the
folder handed to torchvision, which keeps each data set in its own sub-folder (fgvc-aircraft-2013b, caltech101,
cifar-100-python, dtd, eurosat, flowers-102, food-101, MNIST, oxford-iiit-pet, stanford_cars, SUN397), so one
root can hold all eleven.

Splits: the official ones (Aircraft `train`/`test` at the variant level, DTD partition 1 `train`/`test`,
Flowers102 `train`/`test`, Food101, Oxford-IIIT Pets `trainval`/`test`, Stanford Cars, CIFAR-100, MNIST).
Caltech101, EuroSAT and SUN397 have none: torch.utils.data.random_split of the whole set, 80/20 with a
generator seeded 42 (`holdout` / `holdout_seed` change them).

Class names and prompt templates are the MTIL code's: torchvision's names with underscores as spaces, except
Caltech101, EuroSAT and Flowers102, which have hand-written names. KeepLoRA prompts with the first template.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import DatasetSpec
from ..errors import DataError
from .datasets import (
    DatasetSplits,
    FileSource,
    ImageSet,
    ImageSource,
    TorchvisionSource,
    dataset_targets,
    random_split,
    torchvision_errors,
    torchvision_splits,
)
from .registry import LOADERS, register

MTIL_ORDER_I = ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers102", "food101", "mnist",
                "oxford_pets", "stanford_cars", "sun397"]
MTIL_ORDER_II = ["stanford_cars", "food101", "mnist", "oxford_pets", "flowers102", "sun397", "aircraft",
                 "caltech101", "dtd", "eurosat", "cifar100"]
# official epochs per task (KeepLoRA's configs); KeepLoRA+ trains shorter
EPOCHS = {
    ("keeplora", "I"): [10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5],
    ("keeplora", "II"): [5, 2, 5, 5, 5, 5, 10, 10, 10, 10, 10],
    ("keeplora+", "I"): [5] * 11,
    ("keeplora+", "II"): [5, 1, 1, 5, 5, 5, 5, 5, 5, 5, 5],
}
NUM_CLASSES = {"aircraft": 100, "caltech101": 101, "cifar100": 100, "dtd": 47, "eurosat": 10, "flowers102": 102,
               "food101": 101, "mnist": 10, "oxford_pets": 37, "stanford_cars": 196, "sun397": 397}

_CIFAR_TEMPLATES = ["a photo of a {c}.", "a blurry photo of a {c}.", "a black and white photo of a {c}.",
                    "a low contrast photo of a {c}.", "a high contrast photo of a {c}.", "a bad photo of a {c}.",
                    "a good photo of a {c}.", "a photo of a small {c}.", "a photo of a big {c}.",
                    "a photo of the {c}.", "a blurry photo of the {c}.", "a black and white photo of the {c}.",
                    "a low contrast photo of the {c}.", "a high contrast photo of the {c}.",
                    "a bad photo of the {c}.", "a good photo of the {c}.", "a photo of the small {c}.",
                    "a photo of the big {c}."]
_CALTECH_TEMPLATES = [f"{pre} {{c}}{post}." for pre, post in (
    ("a photo of a", ""), ("a painting of a", ""), ("a plastic", ""), ("a sculpture of a", ""), ("a sketch of a", ""),
    ("a tattoo of a", ""), ("a toy", ""), ("a rendition of a", ""), ("a embroidered", ""), ("a cartoon", ""),
    ("a", " in a video game"), ("a plushie", ""), ("a origami", ""), ("art of a", ""), ("graffiti of a", ""),
    ("a drawing of a", ""), ("a doodle of a", ""), ("a photo of the", ""), ("a painting of the", ""),
    ("the plastic", ""), ("a sculpture of the", ""), ("a sketch of the", ""), ("a tattoo of the", ""), ("the toy", ""),
    ("a rendition of the", ""), ("the embroidered", ""), ("the cartoon", ""), ("the", " in a video game"),
    ("the plushie", ""), ("the origami", ""), ("art of the", ""), ("graffiti of the", ""), ("a drawing of the", ""),
    ("a doodle of the", ""))]

TEMPLATES: dict[str, list[str]] = {
    "aircraft": ["a photo of a {c}, a type of aircraft.", "a photo of the {c}, a type of aircraft."],
    "caltech101": _CALTECH_TEMPLATES,
    "cifar100": _CIFAR_TEMPLATES,
    "dtd": [f"a photo of {a} {{c}} {b}." for a in ("a", "the") for b in ("thing", "texture", "pattern", "object")],
    "eurosat": ["a centered satellite photo of {c}.", "a centered satellite photo of a {c}.",
                "a centered satellite photo of the {c}."],
    "flowers102": ["a photo of a {c}, a type of flower."],
    "food101": ["a photo of a {c}, a type of food."],
    "mnist": ['a photo of the number: "{c}".'],
    "oxford_pets": ["a photo of a {c}, a type of pet."],
    "stanford_cars": ["a photo of the {c}, a type of car.", "a photo of a {c}.", "a photo of the {c}.",
                      "a photo of my {c}.", "i love my {c}!", "a photo of my dirty {c}.", "a photo of my clean {c}.",
                      "a photo of my new {c}.", "a photo of my old {c}."],
    "sun397": ["a photo of the {c}.", "a photo of a {c}."],
}

# hand-written class names, in the order of torchvision's labels (Caltech101: sorted folders without
# BACKGROUND_Google; EuroSAT: sorted folders; Flowers102: the label numbers 1..102)
CALTECH101_CLASSES = [
    "off-center face", "centered face", "leopard", "motorbike", "accordion", "airplane", "anchor", "ant", "barrel",
    "bass", "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly", "camera", "cannon",
    "side of a car", "ceiling fan", "cellphone", "chair", "chandelier", "body of a cougar cat", "face of a cougar cat",
    "crab", "crayfish", "crocodile", "head of a  crocodile", "cup", "dalmatian", "dollar bill", "dolphin",
    "dragonfly", "electric guitar", "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo", "head of a flamingo",
    "garfield", "gerenuk", "gramophone", "grand piano", "hawksbill", "headphone", "hedgehog", "helicopter", "ibis",
    "inline skate", "joshua tree", "kangaroo", "ketch", "lamp", "laptop", "llama", "lobster", "lotus", "mandolin",
    "mayfly", "menorah", "metronome", "minaret", "nautilus", "octopus", "okapi", "pagoda", "panda", "pigeon",
    "pizza", "platypus", "pyramid", "revolver", "rhino", "rooster", "saxophone", "schooner", "scissors", "scorpion",
    "sea horse", "snoopy (cartoon beagle)", "soccer ball", "stapler", "starfish", "stegosaurus", "stop sign",
    "strawberry", "sunflower", "tick", "trilobite", "umbrella", "watch", "water lilly", "wheelchair", "wild cat",
    "windsor chair", "wrench", "yin and yang symbol"]
EUROSAT_CLASSES = [
    "annual crop land", "forest", "brushland or shrubland", "highway or road",
    "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
    "residential buildings or homes or apartments", "river", "lake or sea"]
FLOWERS102_CLASSES = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot", "king protea",
    "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily"]
FIXED_CLASSES = {"caltech101": CALTECH101_CLASSES, "eurosat": EUROSAT_CLASSES, "flowers102": FLOWERS102_CLASSES}


def clip_name(name: str) -> str:
    """MTIL's `process_labels`: torchvision names with underscores as spaces."""
    return name.replace("_", " ")


def _tv(spec: DatasetSpec, cls_name: str, **kw):
    import torchvision.datasets as tvd

    with torchvision_errors(spec, cls_name):
        return getattr(tvd, cls_name)(str(Path(spec.root).expanduser()), download=spec.download, **kw)


def _finish(ds: DatasetSplits, key: str) -> DatasetSplits:
    names = FIXED_CLASSES.get(key) or [clip_name(n) for n in ds.class_names]
    if len(names) != len(ds.class_names):
        raise DataError(f"dataset '{ds.name}' has {len(ds.class_names)} classes on disk, MTIL's {key} has "
                        f"{len(names)}: the copy under its root is incomplete")
    ds.class_keys = ds.class_keys or list(ds.class_names)  # predict names classes as the data does
    ds.class_names = list(names)
    ds.templates = list(TEMPLATES[key])
    ds.template = ds.templates[0]
    return ds


def _official(spec: DatasetSpec, key: str, cls_name: str, train_kw: dict, test_kw: dict,
              needs: str | None = None) -> DatasetSplits:
    if needs is not None:
        import importlib.util

        if importlib.util.find_spec(needs) is None:
            raise DataError(f"dataset '{spec.name}' needs the package '{needs}' (pip install {needs})")
    with torchvision_errors(spec, cls_name):
        ds = torchvision_splits(spec, cls_name, train_kw, test_kw)
    return _finish(ds, key)


def _random_80_20(spec: DatasetSpec, key: str, source: ImageSource, targets, classes: list[str]) -> DatasetSplits:
    test_fraction = spec.holdout if spec.holdout is not None else 0.2
    tr, te = random_split(len(targets), test_fraction, spec.holdout_seed)
    full = ImageSet.from_source(source, np.asarray(targets, dtype=np.int64))
    return _finish(DatasetSplits(spec.name, list(classes), full.subset(tr), full.subset(te)), key)


@register("aircraft")
def _aircraft(spec: DatasetSpec) -> DatasetSplits:
    """FGVC-Aircraft, 100 variants; MTIL trains on `train` (not `trainval`)."""
    return _official(spec, "aircraft", "FGVCAircraft", {"split": "train"}, {"split": "test"})


@register("dtd")
def _dtd(spec: DatasetSpec) -> DatasetSplits:
    """Describable Textures, 47 classes, partition 1: `train` / `test`."""
    return _official(spec, "dtd", "DTD", {"split": "train"}, {"split": "test"})


@register("flowers102")
def _flowers(spec: DatasetSpec) -> DatasetSplits:
    """Oxford Flowers-102, `train` / `test` (needs scipy)."""
    return _official(spec, "flowers102", "Flowers102", {"split": "train"}, {"split": "test"}, needs="scipy")


@register("food101")
def _food(spec: DatasetSpec) -> DatasetSplits:
    return _official(spec, "food101", "Food101", {"split": "train"}, {"split": "test"})


@register("oxford_pets")
def _pets(spec: DatasetSpec) -> DatasetSplits:
    """Oxford-IIIT Pets, 37 breeds, `trainval` / `test`."""
    return _official(spec, "oxford_pets", "OxfordIIITPet", {"split": "trainval"}, {"split": "test"})


@register("stanford_cars")
def _cars(spec: DatasetSpec) -> DatasetSplits:
    """Stanford Cars, 196 classes (needs scipy; torchvision cannot download it any more)."""
    return _official(spec, "stanford_cars", "StanfordCars", {"split": "train"}, {"split": "test"}, needs="scipy")


@register("caltech101")
def _caltech(spec: DatasetSpec) -> DatasetSplits:
    """Caltech101 (101 classes, BACKGROUND_Google dropped). torchvision downloads and lists it; the images are
    read as files, because its __getitem__ imports scipy for the unused annotations."""
    ds = _tv(spec, "Caltech101")
    folder = Path(ds.root) / "101_ObjectCategories"
    paths = [str(folder / ds.categories[y] / f"image_{i:04d}.jpg") for i, y in zip(ds.index, ds.y)]
    return _random_80_20(spec, "caltech101", FileSource(paths, spec.name), ds.y, ds.categories)


@register("eurosat")
def _eurosat(spec: DatasetSpec) -> DatasetSplits:
    ds = _tv(spec, "EuroSAT")
    return _random_80_20(spec, "eurosat", TorchvisionSource(ds, spec.name), dataset_targets(ds), ds.classes)


@register("sun397")
def _sun397(spec: DatasetSpec) -> DatasetSplits:
    """SUN397, 397 scene classes. torchvision lists the images in file-system order (rglob), so the official
    split differs between machines; the list is sorted by path first, which makes the seeded split reproducible."""
    ds = _tv(spec, "SUN397")
    files, labels = getattr(ds, "_image_files", None), getattr(ds, "_labels", None)
    if files is not None and labels is not None:
        order = sorted(range(len(files)), key=lambda i: str(files[i]))
        ds._image_files = [files[i] for i in order]
        ds._labels = [labels[i] for i in order]
    return _random_80_20(spec, "sun397", TorchvisionSource(ds, spec.name), dataset_targets(ds), ds.classes)


def _with_mtil_prompts(key: str) -> None:
    """CIFAR-100 and MNIST were registered before (torchvision or an image-folder copy): add MTIL's names and
    templates. An image-folder MNIST has the digits as folder names; torchvision names them '0 - zero', ..."""
    base = LOADERS[key]

    def load(spec: DatasetSpec) -> DatasetSplits:
        ds = base(spec)
        if key == "mnist" and ds.class_names == [str(d) for d in range(10)]:
            import torchvision.datasets as tvd

            ds.class_names = list(tvd.MNIST.classes)
        return _finish(ds, key)

    load.__doc__ = base.__doc__
    register(key)(load)


for _key in ("cifar100", "mnist"):
    _with_mtil_prompts(_key)


def mtil_names(order: str) -> list[str]:
    return list(MTIL_ORDER_I if order == "I" else MTIL_ORDER_II)


__all__ = ["MTIL_ORDER_I", "MTIL_ORDER_II", "EPOCHS", "NUM_CLASSES", "TEMPLATES", "FIXED_CLASSES", "clip_name",
           "mtil_names"]
