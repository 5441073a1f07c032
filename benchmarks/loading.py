"""Loading throughput: mmkit's manifest loader against torchvision's ImageFolder on the same JPEGs.

Writes ``--images`` synthetic_shapes JPEGs once, listed both by a manifest (write_manifest) and
as an ImageFolder tree (one sub-folder per class, the same bytes), then times one epoch of each
loader, with the same workers, batch size and transform (read from a real mmkit image encoder's
``preprocess``), after a warm-up epoch; each is timed ``--repeats`` times, alternating, and
the best images/s is kept, with the CPU time per image of the loader's processes (steadier
than the rate when other work shares the machine).

``--investigate`` also breaks one item's cost down step by step in one process.

    python benchmarks/loading.py
    python benchmarks/loading.py --investigate
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import torch

from common import data_folder, load_average, machine, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs written (and read per epoch)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the written JPEGs in pixels")
    parser.add_argument("--crop", type=int, default=224, help="the encoder's image_size (resize + crop)")
    parser.add_argument("--model", default="resnet18", help="the timm model whose preprocess is used")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for both loaders")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per loader; the best is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", help="write the images here and keep them (default: a temp folder)")
    parser.add_argument("--investigate", action="store_true",
                        help="also break one item's cost down step by step")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "loading.json"),
                        help="where the numbers go")
    args = parser.parse_args()

    load_before = load_average()
    with data_folder(args.folder, "mmkit-loading-") as folder:
        started = time.perf_counter()
        manifest, image_root = write_images(folder, args.images, args.image_size, args.seed)
        print(f"{args.images} JPEGs ({args.image_size} px) in {folder}, "
              f"{time.perf_counter() - started:.1f}s to write or find")
        encoder = image_encoder(args.model, args.crop)
        results = compare(manifest, image_root, encoder, args)
        if args.investigate:
            results["investigation"] = investigate(manifest, image_root, encoder)
    results["setup"] = {**setup(args), "load_before": load_before, "load_after": load_average()}
    print_table(results)
    write_results(results, args.json)


def write_images(folder: Path, count: int, size: int, seed: int) -> tuple[Path, Path]:
    """The JPEGs as a manifest (image, label) and, copied byte for byte, as an ImageFolder tree;
    a kept ``--folder`` written with the same settings is used as it is."""
    from mmkit.data.manifest import write_manifest
    from mmkit.data.shapes import SyntheticShapes

    manifest, image_root, written = folder / "manifest" / "train.csv", folder / "image_folder", folder / "written.json"
    settings = {"images": count, "image_size": size, "seed": seed}
    if written.exists() and json.loads(written.read_text()) == settings:
        return manifest, image_root
    shutil.rmtree(manifest.parent, ignore_errors=True)
    shutil.rmtree(image_root, ignore_errors=True)
    shapes = SyntheticShapes(num_samples=count, image_size=size, seed=seed)
    labels: list[int] = []

    def samples() -> Iterator[dict[str, Any]]:
        for index in range(count):
            sample = shapes[index]
            labels.append(sample["label"])
            yield {"id": sample["id"], "image": sample["image"], "label": sample["label"]}

    write_manifest(samples(), manifest)
    for index, label in enumerate(labels):
        target = image_root / f"class_{label:03d}" / f"{index:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest.parent / "images" / manifest.stem / f"{index:06d}.jpg", target)
    written.write_text(json.dumps(settings))
    return manifest, image_root


def image_encoder(model: str, crop: int) -> Any:
    """A real mmkit image encoder, whose ``preprocess`` is the transform a recipe run uses."""
    from mmkit.components import build

    return build("image_encoders", "timm", model_name=model, image_size=crop, pretrained=False)


def torchvision_twin(encoder: Any) -> Any:
    """torchvision's Resize + CenterCrop + ToTensor + Normalize with the sizes, interpolation,
    mean and std of mmkit's transform (ImageFolder's loader already converts to RGB)."""
    from torchvision import transforms

    steps = {type(step).__name__: step for step in encoder.preprocess.transforms}
    resize, crop, normalize = steps["Resize"], steps["CenterCrop"], encoder.on_device
    return transforms.Compose([
        transforms.Resize(resize.size, interpolation=resize.interpolation, antialias=resize.antialias),
        transforms.CenterCrop(crop.size),
        transforms.ToTensor(),
        transforms.Normalize(normalize.mean, normalize.std),
    ])


def mmkit_loader(manifest: Path, encoder: Any, args: argparse.Namespace, device: str) -> tuple[Any, Any]:
    """Manifest -> Preprocessed -> EpochBatches + train_loader, as a recipe run on ``device``
    builds them: a CPU run's workers normalise the pixels, a GPU run's give uint8 batches."""
    from mmkit.data.loader import Collate, EpochBatches, Preprocessed, train_loader
    from mmkit.data.manifest import Manifest

    dataset = Preprocessed(Manifest(str(manifest)), {"image": encoder.preprocess})
    sampler = EpochBatches(len(dataset), args.batch_size, args.seed)
    finish = {"image": encoder.on_device} if device == "cpu" else {}
    return train_loader(dataset, sampler, args.workers, pin_memory=False, collate=Collate(finish=finish)), sampler


def torchvision_loader(image_root: Path, encoder: Any, args: argparse.Namespace) -> Any:
    """ImageFolder + a shuffled DataLoader; persistent workers like mmkit's, so both are timed warm."""
    from torch.utils.data import DataLoader
    from torchvision import datasets

    dataset = datasets.ImageFolder(str(image_root), transform=torchvision_twin(encoder))
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                      num_workers=args.workers, persistent_workers=args.workers > 0,
                      generator=torch.Generator().manual_seed(args.seed))


def epoch_rate(loader: Any, images_of: Callable[[Any], torch.Tensor], before: Callable[[], None]) -> dict[str, float]:
    """One epoch of a loader: images, seconds and images/s (from asking for the iterator to
    holding the last batch), and the CPU time this process and the loader's workers spent
    per image, which other processes' load on the machine changes far less than the rate."""
    before()
    processes = [psutil.Process(), *worker_processes(loader)]  # persistent workers: known after the warm-up
    cpu, images, started = cpu_seconds(processes), 0, time.perf_counter()
    for batch in loader:
        images += images_of(batch).shape[0]
    seconds, cpu = time.perf_counter() - started, cpu_seconds(processes) - cpu
    timed = {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1)}
    return {**timed, "cpu_ms_per_image": round(1000 * cpu / images, 3)} if len(processes) > 1 else timed


def worker_processes(loader: Any) -> list[psutil.Process]:
    """The running workers of a loader with persistent workers (none before its first epoch)."""
    workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
    return [psutil.Process(worker.pid) for worker in workers if worker.is_alive()]


def cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(sum(process.cpu_times()[:2]) for process in processes)


def mmkit_epochs(manifest: Path, encoder: Any, args: argparse.Namespace,
                 device: str = "cpu") -> Callable[[], dict[str, float]]:
    """One epoch of mmkit's loader per call, each the sampler's next epoch."""
    loader, sampler = mmkit_loader(manifest, encoder, args, device)
    epochs = iter(range(10**6))
    return lambda: epoch_rate(loader, lambda batch: batch["image"], lambda: sampler.set_epoch(next(epochs)))


def torchvision_epochs(image_root: Path, encoder: Any, args: argparse.Namespace) -> Callable[[], dict[str, float]]:
    loader = torchvision_loader(image_root, encoder, args)
    return lambda: epoch_rate(loader, lambda batch: batch[0], lambda: None)


def compare(manifest: Path, image_root: Path, encoder: Any, args: argparse.Namespace) -> dict[str, Any]:
    """A warm-up epoch for each loader, then ``repeats`` rounds of one timed epoch each.

    Timing the loaders in turn, round after round, spreads any load from other processes
    over both; the best epoch of each is kept."""
    runs = {"mmkit": mmkit_epochs(manifest, encoder, args),
            "torchvision": torchvision_epochs(image_root, encoder, args),
            "mmkit, uint8 (a GPU run's workers)": mmkit_epochs(manifest, encoder, args, "cuda")}
    results: dict[str, Any] = {name: {"warmup": run()} for name, run in runs.items()}
    for _ in range(args.repeats):
        for name, run in runs.items():
            timed = run()
            results[name].setdefault("timed", []).append(timed)
            print(f"  {name:36s} {timed['images_per_s']:8.1f} images/s {timed['cpu_ms_per_image']:7.2f} CPU ms/image")
    for name in runs:
        timed = results[name]["timed"]
        results[name]["best_images_per_s"] = max(t["images_per_s"] for t in timed)
        results[name]["median_cpu_ms_per_image"] = statistics.median(t["cpu_ms_per_image"] for t in timed)
    tv = results["torchvision"]
    for name in runs:
        results[name]["ratio_to_torchvision"] = round(results[name]["best_images_per_s"] / tv["best_images_per_s"], 3)
        results[name]["cpu_ratio_to_torchvision"] = round(
            tv["median_cpu_ms_per_image"] / results[name]["median_cpu_ms_per_image"], 3)
    return {"loaders": results, "ratio_mmkit_over_torchvision": results["mmkit"]["ratio_to_torchvision"],
            "cpu_ratio_mmkit_over_torchvision": results["mmkit"]["cpu_ratio_to_torchvision"]}


def investigate(manifest: Path, image_root: Path, encoder: Any) -> dict[str, Any]:
    """Where an item's time goes, mmkit against torchvision, in this process with one thread
    (as in a DataLoader worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps, items = step_costs(manifest, image_root, encoder), item_costs(manifest, image_root, encoder)
    finally:
        torch.set_num_threads(threads)
    print("  per-item cost, one process, one thread (median us):")
    for name, micros in {**steps, **items}.items():
        print(f"    {name:44s} {micros:8.1f}")
    return {"step_cost_us": steps, "item_cost_us": items}


def step_costs(manifest: Path, image_root: Path, encoder: Any, count: int = 300) -> dict[str, float]:
    """Median microseconds of each step of an item, one step at a time."""
    from torch.utils.data import default_collate
    from torchvision import datasets

    from mmkit.data.loader import Collate, Preprocessed
    from mmkit.data.manifest import Manifest
    from mmkit.data.read import Where, file_bytes, read_image

    dataset = Manifest(str(manifest))
    folder = datasets.ImageFolder(str(image_root))
    twin = torchvision_twin(encoder)
    where = Where("benchmark")
    paths = [dataset.folder / dataset.samples[i][0].cells["image"] for i in range(count)]
    tv_paths = [folder.samples[i][0] for i in range(count)]
    images = [read_image(file_bytes(path, where), where) for path in paths]
    preprocessed = Preprocessed(dataset, {"image": encoder.preprocess})
    samples = [preprocessed[(i, 0)] for i in range(64)]
    pixels = Collate()(samples)["image"]
    tv_samples = [(twin(image), 0) for image in images[:64]]

    def per_item(work: Callable[[int], Any]) -> float:
        work(0)
        times = []
        for i in range(count):
            started = time.perf_counter()
            work(i)
            times.append(time.perf_counter() - started)
        return round(statistics.median(times) * 1e6, 1)

    def per_item_of_batch(collate: Callable[[], Any], batches: int = 30) -> float:
        collate()
        times = []
        for _ in range(batches):
            started = time.perf_counter()
            collate()
            times.append(time.perf_counter() - started)
        return round(statistics.median(times) * 1e6 / len(samples), 1)

    return {
        "mmkit: read file bytes": per_item(lambda i: file_bytes(paths[i], where)),
        "mmkit: read_image (BytesIO, load)": per_item(lambda i: read_image(file_bytes(paths[i], where), where)),
        "mmkit: Manifest[i] (the whole raw sample)": per_item(lambda i: dataset[i]),
        "mmkit: preprocess (to_rgb .. PixelTensor)": per_item(lambda i: encoder.preprocess(images[i])),
        "mmkit: Collate, per item of a batch of 64": per_item_of_batch(lambda: Collate()(samples)),
        "mmkit: Normalize (on_device), per item of 64": per_item_of_batch(lambda: encoder.on_device(pixels)),
        "torchvision: pil_loader (open, convert)": per_item(lambda i: folder.loader(tv_paths[i])),
        "torchvision: transform (.. ToTensor, Normalize)": per_item(lambda i: twin(images[i])),
        "torchvision: default_collate, per item of 64": per_item_of_batch(lambda: default_collate(tv_samples)),
    }


def item_costs(manifest: Path, image_root: Path, encoder: Any, count: int = 500) -> dict[str, float]:
    """Median microseconds of a whole item, the two interleaved item by item (so load from
    other processes falls on both alike)."""
    from torchvision import datasets

    from mmkit.data.loader import Preprocessed
    from mmkit.data.manifest import Manifest

    loaders = {"mmkit: Preprocessed[(i, seed)]": Preprocessed(Manifest(str(manifest)), {"image": encoder.preprocess}),
               "torchvision: ImageFolder[i]": datasets.ImageFolder(str(image_root), transform=torchvision_twin(encoder))}
    items = {"mmkit: Preprocessed[(i, seed)]": lambda i: (i, 0), "torchvision: ImageFolder[i]": lambda i: i}
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for i in range(count):
        for name, dataset in loaders.items():
            started = time.perf_counter()
            dataset[items[name](i)]
            times[name].append(time.perf_counter() - started)
    return {name: round(statistics.median(values) * 1e6, 1) for name, values in times.items()}


def setup(args: argparse.Namespace) -> dict[str, Any]:
    import PIL
    import torchvision

    return {**machine(), "torchvision": torchvision.__version__, "pillow": PIL.__version__,
            **{k: v for k, v in vars(args).items() if k not in ("json", "folder")}}


def print_table(results: dict[str, Any]) -> None:
    s = results["setup"]
    print(f"\n{s['images']} JPEGs of {s['image_size']} px -> {s['crop']} px, batch {s['batch_size']}, "
          f"{s['workers']} workers, {s['cpu_cores']} CPU cores; best of {s['repeats']} epochs")
    print(f"machine load average before/after: {s['load_before']} / {s['load_after']}")
    print(f"{'loader':37s} {'images/s':>9s} {'ratio':>6s} {'CPU ms/img':>10s} {'ratio':>6s}  images/s of each epoch")
    for name, loader in results["loaders"].items():
        timed = ", ".join(f"{t['images_per_s']:.0f}" for t in loader["timed"])
        print(f"{name:37s} {loader['best_images_per_s']:9.1f} {loader['ratio_to_torchvision']:6.3f} "
              f"{loader['median_cpu_ms_per_image']:10.3f} {loader['cpu_ratio_to_torchvision']:6.3f}  {timed}")
    print("(images/s: the best epoch; CPU ms/img: the median epoch's CPU time of the workers and this process;"
          " ratios: torchvision = 1, higher is faster)")
    print(f"mmkit / torchvision: {results['ratio_mmkit_over_torchvision']:.3f} in images/s, "
          f"{results['cpu_ratio_mmkit_over_torchvision']:.3f} in CPU per image (target: at least 1.0)")


if __name__ == "__main__":
    main()
