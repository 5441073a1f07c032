"""The `mmkit` command line."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from mmkit.errors import MMKitError

if TYPE_CHECKING:
    import pluggy


class _Group(click.Group):
    """Prints MMKitError as one line per problem (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MMKitError as error:
            if ctx.params.get("debug"):
                raise
            for line in str(error).splitlines():
                click.echo(f"mmkit: error: {line}", err=True)
            ctx.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="mmkit")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def cli(debug: bool) -> None:
    """mmkit: multimodal training from TOML recipes and plugins."""


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Continue the run folder from its last checkpoint.")
def run(recipe: str, overrides: tuple[str, ...], resume: bool) -> None:
    """Train and evaluate RECIPE; OVERRIDES are dotted KEY=VALUE pairs (train.lr=3e-4)."""
    from mmkit.engine.loop import Stopped
    from mmkit.engine.run import Run
    from mmkit.recipe import load_recipe

    job = Run(load_recipe(recipe, overrides), resume=resume)
    try:
        summary = job.fit()
    except Stopped as stopped:
        click.echo(f"mmkit: {stopped}", err=True)
        sys.exit(stopped.code)
    if summary:
        click.echo(f"run folder: {job.paths.folder}")
        _print_metrics(summary)


def _print_metrics(summary: dict[str, Any]) -> None:
    for key, value in summary["metrics"].items():
        chance = summary["chance"].get(key)
        suffix = f"  (chance {chance:.4g})" if chance is not None else ""
        click.echo(f"  {key}: {value:.4g}{suffix}")


@cli.command(name="eval")
@click.argument("run_folder", type=click.Path(file_okay=False))
@click.argument("overrides", nargs=-1)
def evaluate(run_folder: str, overrides: tuple[str, ...]) -> None:
    """Evaluate a finished run's weights again: on its own held-out set, or with data or
    evaluation settings changed by OVERRIDES (data.val.num_samples=2000); writes RUN_FOLDER/eval."""
    from pathlib import Path

    from mmkit.engine.run import Run
    from mmkit.recipe import load_recipe

    folder = Path(run_folder)
    if not (folder / "recipe.toml").exists():
        raise MMKitError(f"{folder} has no recipe.toml: give the folder of a finished run (runs/<name>)")
    job = Run(load_recipe(folder / "recipe.toml", overrides))
    summary = job.evaluate(folder)
    if summary:
        click.echo(f"eval folder: {job.paths.folder}")
        _print_metrics(summary)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
def validate(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check RECIPE (with OVERRIDES) without building a model: its tables, and that its
    datasets give what its encoders take (a manifest's rows are read, no sample is)."""
    from mmkit.components import build_datasets
    from mmkit.data.examples import example_missing
    from mmkit.plugins import get_registry
    from mmkit.recipe import check_recipe, load_recipe

    loaded, registry = load_recipe(recipe, overrides), get_registry()
    check_recipe(loaded, registry)
    if example_missing(loaded, registry):
        click.echo(f"{recipe}: ok (its datasets are checked once [data.example] has written their files)")
        return
    build_datasets(loaded, registry)
    click.echo(f"{recipe}: ok")


@cli.command(name="list")
@click.argument("kind", required=False)
@click.argument("pattern", default="*")
def list_components(kind: str | None, pattern: str) -> None:
    """List components, all or of one KIND, optionally filtered by a glob PATTERN."""
    from mmkit.plugins import get_registry
    from mmkit.registry import KINDS

    registry = get_registry()
    kinds = [kind] if kind else list(KINDS)
    for name in kinds:
        components = registry.components(name, pattern)
        if kind is None and not components:
            continue
        click.echo(f"{components[0].kind if components else name}:")
        for component in components:
            click.echo(f"  {component.name:<20} {component.summary}  [{component.plugin}]")


@cli.command()
@click.argument("kind")
@click.argument("name")
def info(kind: str, name: str) -> None:
    """Show a component's parameters (types, defaults) and documentation."""
    from mmkit.plugins import get_registry
    from mmkit.registry import KINDS, PART_KINDS, read_params
    from mmkit.specs import DataSpec, PartSpec

    component = get_registry().get(kind, name)
    click.echo(f'{KINDS[component.kind]} "{component.name}" from plugin {component.plugin}\n')
    click.echo(component.description + "\n")
    click.echo("parameters:" if component.params else "parameters: none")
    _echo_params(component.params)
    if component.kind in PART_KINDS:
        click.echo("\nkeys mmkit applies to every [model.*] part:")
        _echo_params(read_params("", PartSpec))
    if component.kind == "datasets":
        click.echo("\nkeys mmkit applies to every [data] table:")
        _echo_params(read_params("", DataSpec))


def _echo_params(params: dict[str, Any]) -> None:
    for param in params.values():
        default = "required" if param.required else f"default {param.default!r}"
        click.echo(f"  {param.name}: {param.type_name}  ({default})")
        if param.doc:
            click.echo(f"      {param.doc}")


@cli.command()
def plugins() -> None:
    """List loaded plugins with their versions and what each registers."""
    from mmkit.plugins import load_plugins

    loaded = load_plugins()
    for info in loaded.infos.values():
        click.echo(f"{info.name} {info.version}")
        for kind, names in info.registers.items():
            click.echo(f"  {kind}: {', '.join(names)}")


@cli.command()
@click.argument("run_folder", type=click.Path(file_okay=False))
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option("--out", default="embeddings.safetensors", show_default=True, type=click.Path(dir_okay=False),
              help="The index file to write.")
@click.option("--on-error", type=click.Choice(["raise", "skip"]), default="raise", show_default=True,
              help="An unreadable file stops the command, or is left out and listed.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="Where the encoders run (cpu, cuda).")
def embed(run_folder: str, sources: tuple[str, ...], out: str, on_error: str, batch_size: int, device: str) -> None:
    """Embed SOURCES with a finished run's encoders into one index file for `mmkit search`:
    image and audio files, folders of them, and .txt files of one text a line."""
    from pathlib import Path

    from mmkit.search import EMBED_ARGUMENT, gather, write_index
    from mmkit.trained import load_run

    trained = load_run(run_folder, device)
    items = gather([Path(s) for s in sources], on_error)
    embedded = trained.embed(**{EMBED_ARGUMENT[m]: values for m, values in items.values.items()}, batch_size=batch_size)
    write_index(Path(out), Path(run_folder), embedded, items.names, shared=trained.shared_space)
    counts = ", ".join(f"{len(names)} {m}" for m, names in items.names.items())
    click.echo(f"embedded {counts} with {run_folder} into {out}")
    if items.skipped:
        click.echo(f"skipped {len(items.skipped)} unreadable file(s):")
        for error in items.skipped:
            click.echo(f"  {error.line()}")


@cli.command()
@click.argument("index", type=click.Path(dir_okay=False))
@click.argument("query")
@click.option("-k", "--top", type=click.IntRange(min=1), default=5, show_default=True, help="How many rows to show.")
@click.option("--device", default="cpu", show_default=True, help="Where the query's encoder runs (cpu, cuda).")
@click.option("--text", is_flag=True, help="QUERY is words, even where they look like an image or audio file name.")
def search(index: str, query: str, top: int, device: str, text: bool) -> None:
    """The rows of INDEX (written by `mmkit embed`) nearest QUERY: a text, or the path of an
    image or audio file; by cosine similarity, with the run the index was made with."""
    from pathlib import Path

    from mmkit.search import EMBED_ARGUMENT, nearest, query_value, read_index
    from mmkit.trained import load_run

    found = read_index(Path(index))
    modality, value = query_value(query, text)
    trained = load_run(found.run, device)
    vector = trained.embed(**{EMBED_ARGUMENT[modality]: [value]})[modality][0]
    for rank, (kind, name, score) in enumerate(nearest(found, vector, modality, top), 1):
        click.echo(f"{rank:>3}  {score:.4f}  {kind:<5}  {name}")


@cli.command(name="new-plugin")
@click.argument("name")
@click.option("--kind", default="image_encoders", show_default=True,
              help="What it adds: image_encoders, text_encoders, audio_encoders, fusion_heads or datasets.")
@click.option("--dir", "parent", type=click.Path(file_okay=False), default=".", show_default=True,
              help="The folder to write the package folder NAME in.")
def new_plugin(name: str, kind: str, parent: str) -> None:
    """Write a plugin package NAME (e.g. mmkit-myencoder) with one working component of KIND,
    its hook, entry point and test: install it and it is in `mmkit list` and in recipes."""
    import shlex
    from pathlib import Path

    from mmkit.plugins import get_registry
    from mmkit.scaffold import new_plugin as write_plugin

    folder, written, recipe = write_plugin(name, kind, Path(parent), get_registry())
    click.echo(f"wrote {folder}:")
    for path in written:
        click.echo(f"  {path.relative_to(folder)}")
    quoted = shlex.quote(str(folder))
    click.echo(f"next:\n  pip install -e {quoted}\n  mmkit list\n  {recipe}   # from a checkout of mmkit\n"
               f"  python -m pytest {shlex.quote(str(folder / 'tests'))}")


@cli.group()
def data() -> None:
    """Look over datasets before training on them."""


@data.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--column", "columns", multiple=True, metavar="KEY=COLUMN",
              help="For a manifest: the column giving sample KEY (repeat a key to list several columns).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Reader processes (default: one per CPU, four at most; 0 reads in this process).")
def check(source: str, overrides: tuple[str, ...], columns: tuple[str, ...], workers: int | None) -> None:
    """Read every sample of SOURCE's datasets and list the bad ones by kind.

    SOURCE is a recipe (its [data] set and [data.val]; OVERRIDES are dotted KEY=VALUE pairs)
    or a .csv/.jsonl manifest (each split it names; OVERRIDES are the manifest's parameters,
    such as split=val). Exits 1 if any sample is bad.
    """
    from pathlib import Path

    from tqdm.auto import tqdm

    from mmkit.data.check import (check_dataset, default_workers, format_checks, manifest_datasets,
                                  manifest_params, recipe_datasets)
    from mmkit.data.manifest import SUFFIXES
    from mmkit.plugins import get_registry
    from mmkit.recipe import load_recipe

    registry = get_registry()
    if Path(source).suffix.lower() in SUFFIXES:
        datasets = manifest_datasets(source, manifest_params(overrides, columns), registry)
    elif columns:
        raise MMKitError("--column is for a manifest path; map a recipe's columns in its [data] columns")
    else:
        datasets = recipe_datasets(load_recipe(source, overrides), registry)
    workers = default_workers() if workers is None else workers
    checks = {}
    for name, dataset in datasets.items():
        total = None if hasattr(dataset, "records") else len(dataset)
        with tqdm(total=total, desc=name, unit="sample", dynamic_ncols=True, disable=None) as bar:
            checks[name] = check_dataset(dataset, workers, bar.update)
    for line in format_checks(checks):
        click.echo(line)
    if any(checked.problems for checked in checks.values()):
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `mmkit` script: adds plugins' commands, then runs."""
    from mmkit.plugins import loaded_manager

    _add_plugin_commands(loaded_manager()[0])
    try:
        cli.main(args=argv, prog_name="mmkit")
    except KeyboardInterrupt:
        click.echo("mmkit: interrupted", err=True)
        sys.exit(130)


def _add_plugin_commands(manager: pluggy.PluginManager) -> None:
    """Let each plugin add its commands; a name already taken (a builtin's, an earlier plugin's)
    keeps its command, and the clash is reported, so no plugin silently replaces `mmkit run`."""
    from mmkit.errors import one_line

    owners = dict.fromkeys(cli.commands, "mmkit")
    for impl in manager.hook.register_commands.get_hookimpls():
        plugin, before = manager.get_name(impl.plugin), dict(cli.commands)
        try:
            impl.function(cli)
        except Exception as error:  # one plugin's broken command must not take the CLI down
            click.echo(f'mmkit: plugin "{plugin}" failed in register_commands: {one_line(error)}', err=True)
        for name, command in list(cli.commands.items()):
            if name in before and command is not before[name]:
                cli.commands[name] = before[name]
                click.echo(f'mmkit: plugin "{plugin}" registers command "{name}", already registered by '
                           f"{owners[name]}; ignored", err=True)
            owners.setdefault(name, f'plugin "{plugin}"')
