"""The settings a user gives `dgm train`: which keys there are, what each one means, and the
one-line refusal of any other.

Hydra refuses a key that its config lacks (`trainer.epoch=1`) with the advice to add it
(`+trainer.epoch=1`), which dgm would then ignore. `check` composes, before Hydra runs, the
config that the command would train (each combination of its config groups, in a sweep) and
refuses every key that config lacks, naming the closest real ones. `describe` is
`dgm train --help`: every option of the chosen groups with the comment its config file gives it.
"""

import contextlib
import difflib
import itertools
from importlib import resources
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override, OverrideType, ValueType
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dgm_cli.errors import DgmError

CONFIGS = "dgm_cli.configs"
# Hydra's flags that take a value (`--cfg job`), so that the value is not read as an override.
FLAG_VALUES = {"--cfg": None, "-c": None, "--package": None, "-p": None, "--config-path": None, "-cp": None,
               "--config-name": None, "-cn": None, "--config-dir": None, "-cd": None,
               "--experimental-rerun": None, "--shell-completion": None,
               "--info": {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"},
               "-i": {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}}
# Config nodes whose other keys are passed on as a library's own arguments (optax's, which
# refuses those it lacks: optim._builder), so a user may add them: +optimizer.eps_root=1e-8.
PASSED_ON = ("optimizer", "model.m_step_optimizer")
COMBINATIONS = 64  # of a sweep's config groups, composed to check its keys; more are left to Hydra
GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def split(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, the overrides) of a `dgm train` command line."""
    flags, overrides = [], []
    arguments = iter(args)
    for arg in arguments:
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        flags.append(arg)
        if arg in FLAG_VALUES:
            value = next(arguments, None)
            if value is None:
                break
            if FLAG_VALUES[arg] is None or value in FLAG_VALUES[arg]:
                flags.append(value)
            else:
                overrides.append(value)
    return flags, overrides


def _flag(flags: list[str], *names: str) -> str | None:
    for index, flag in enumerate(flags):
        for name in names:
            if flag == name and index + 1 < len(flags):
                return flags[index + 1]
            if flag.startswith(name + "="):
                return flag.split("=", 1)[1]
    return None


def parse(overrides: list[str]) -> list[Override]:
    """Hydra's reading of each override, or a DgmError that says what is wrong with the one it
    cannot read and how to write it (a list the shell split at its spaces: quote it)."""
    parser = OverridesParser.create()
    parsed = []
    for index, override in enumerate(overrides):
        try:
            parsed.extend(parser.parse_overrides([override]))
        except OverrideParseException as error:
            raise DgmError(_unreadable(overrides, index, str(error).splitlines()[0])) from None
    return parsed


def _open_brackets(text: str) -> int:
    return sum(text.count(opening) - text.count(closing) for opening, closing in ("[]", "{}", "()"))


def _unreadable(overrides: list[str], index: int, reason: str) -> str:
    override = overrides[index]
    if "=" not in override and not override.startswith("~"):
        before = overrides[index - 1] if index else ""
        if index and _open_brackets(before) > 0:  # `model.hidden=[500,` `500]`: the shell split one
            return _split_by_the_shell(overrides, index - 1)
        return (f"{override} is not an override (KEY=VALUE, GROUP=OPTION, +KEY=VALUE or ~KEY); "
                f"dgm train --help lists them")
    if _open_brackets(override) > 0:
        return _split_by_the_shell(overrides, index)
    return (f"cannot read the override {override} ({reason}); a value with spaces, quotes, brackets or "
            f"$ must be quoted for the shell, as in 'model.hidden=[500, 500]' (Hydra's override grammar: {GRAMMAR})")


def _split_by_the_shell(overrides: list[str], start: int) -> str:
    """The message for an override with an open bracket, joined with the words after it that
    close it, which is what the user typed before the shell split it at its spaces."""
    end = start + 1
    while end < len(overrides) and _open_brackets(" ".join(overrides[start:end])) > 0 and "=" not in overrides[end]:
        end += 1
    typed = " ".join(overrides[start:end])
    if _open_brackets(typed) > 0:
        return f"{typed} has an unclosed bracket: close it, as in model.hidden=[500,500]"
    return (f"{typed} reached dgm as {end - start} words, split by the shell at its spaces: quote it, "
            f"'{typed}', or write it without spaces, {typed.replace(' ', '')}")


def is_group(key: str) -> bool:
    """`model`, `experiment`, `hydra/launcher`: a config group (chosen by name), not a setting."""
    return "/" in key or (resources.files(CONFIGS) / key).is_dir()


@contextlib.contextmanager
def _configs(flags: list[str]):
    """Hydra's compose API on the configs that the command line names: the package's, or those
    of --config-path (a run's saved config, for dgm rerun and resume=RUN)."""
    path = _flag(flags, "--config-path", "-cp")
    if path is None or path.startswith("pkg://"):
        context = initialize_config_module((path or "pkg://" + CONFIGS).removeprefix("pkg://"), version_base="1.3")
    else:
        context = initialize_config_dir(str(Path(path.removeprefix("file://")).absolute()), version_base="1.3")
    with context:  # it keeps and restores whatever Hydra had set up before
        yield _flag(flags, "--config-name", "-cn") or "train", path is None


def _choices(override: Override, package: bool) -> list[str] | None:
    """The group overrides, one per value of a sweep over the group; None if unknowable."""
    if override.is_delete() or not override.is_sweep_override():
        return [override.input_line]
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        if not package:
            return None
        glob: Glob = override.value()
        values = glob.filter(GlobalHydra.instance().config_loader().get_group_options(override.key_or_group))
    elif override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP, ValueType.RANGE_SWEEP):
        values = list(override.sweep_string_iterator())
    else:
        return None
    return [f"{override.get_key_element()}={value}" for value in values]


def check(args: list[str]) -> None:
    """Refuse, in one line, an override that Hydra cannot read, or a key that the config the
    command trains does not have: a misspelt key, with or without +. Hydra's own hydra.* keys
    and the keys that optax takes (PASSED_ON) are Hydra's and optax's to check."""
    flags, overrides = split(args)
    parsed = parse(overrides)
    if _flag(flags, "--config-dir", "-cd") is not None:  # configs of the user's own: Hydra checks them
        return
    groups = [o for o in parsed if is_group(o.key_or_group) and not o.key_or_group.startswith("hydra")]
    keys = [o for o in parsed if not is_group(o.key_or_group) and o.key_or_group.split(".")[0] != "hydra"]
    if not keys:
        return
    try:
        with _configs(flags) as (config_name, package):
            choices = [_choices(o, package) for o in groups] if package else []
            if None in choices:
                return
            for combination in itertools.islice(itertools.product(*choices), COMBINATIONS):
                config = OmegaConf.to_container(compose(config_name, overrides=list(combination)))
                for override in keys:
                    problem = _key_problem(override, config)
                    if problem:
                        raise DgmError(problem)
    except (HydraException, OmegaConfBaseException):
        return  # a group or config that does not compose: Hydra says so itself, in dgm's voice (cli.one_line)


def _has(config, key: str) -> bool:
    node = config
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _passed_on(key: str, config) -> bool:
    return any(key.startswith(node + ".") and _has(config, node) for node in PASSED_ON)


def _key_problem(override: Override, config: dict) -> str | None:
    key = override.key_or_group
    if _has(config, key):
        if override.type == OverrideType.ADD:
            return f"{key} is a setting already: set it without the +, as {override.input_line[1:]}"
        if override.is_delete() and not _passed_on(key, config):
            return f"~{key} would delete a setting that dgm needs: give it a value instead, as {key}=VALUE"
        return None
    if override.type in (OverrideType.ADD, OverrideType.FORCE_ADD, OverrideType.DEL) and _passed_on(key, config):
        return None
    return unknown(key, paths(config), _held_by_other_options(key, config))


def paths(config: dict, prefix: str = "") -> list[str]:
    """Every setting of a config, nested ones dotted (`eval.num_samples`): its leaves, less
    Hydra's own and the names that choosing a group sets (`model.name`)."""
    found = []
    for name, value in config.items():
        if not prefix and name == "hydra" or name == "name" and prefix and is_group(prefix[:-1]):
            continue
        found.extend(paths(value, f"{prefix}{name}.") if isinstance(value, dict) and value else [prefix + name])
    return found


def unknown(key: str, known: list[str], context: str = "", what: str = "a setting",
            otherwise: str = "; dgm train --help lists the settings") -> str:
    """"trainer.epoch is not a setting; did you mean trainer.epochs?", the closest of `known`
    (difflib's), or `otherwise` where none is close."""
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.8)
    message = f"{key} is not {what}{context}"
    if not close:
        return message + ("" if context else otherwise)
    return f"{message}; did you mean {close[0] if len(close) == 1 else ', '.join(close[:-1]) + ' or ' + close[-1]}?"


def _held_by_other_options(key: str, config: dict) -> str:
    """" of model=vae; model=sbn and model=wakesleep have it", for a key of other options of its group."""
    group, _, rest = key.partition(".")
    folder = resources.files(CONFIGS) / group
    if not rest or not folder.is_dir() or not isinstance(config.get(group), dict):
        return ""
    having = sorted(path.name.removesuffix(".yaml") for path in folder.iterdir() if path.name.endswith(".yaml")
                    and _has(OmegaConf.to_container(OmegaConf.load(path)), rest))
    chosen = config[group].get("name")
    if not having or chosen is None:
        return ""
    return f" of {group}={chosen}; {' and '.join(f'{group}={name}' for name in having)} {'has' if len(having) == 1 else 'have'} it"


def _sentence(lines: list[str]) -> str:
    """Comment lines joined up to the first that ends a sentence (or a heading: "…:")."""
    taken = []
    for line in lines:
        taken.append(line)
        if line.endswith((".", ":", ")")):
            break
    return " ".join(taken)


def header(text: str) -> str:
    """A config file's description: its leading comment (Hydra's `# @package` line aside)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line.lstrip("#").strip())
    return _sentence([line for line in lines if line])


def comments(text: str) -> dict[str, str]:
    """{dotted key: its description} of a YAML config: the comment after the key's value, with
    the comment lines below it that are indented under it, or else the comment block right above
    the key. PyYAML's nodes say where each key and value end; comments are the rest of the line."""
    lines = text.splitlines()
    found = {}

    def comment_at(line: int, column: int) -> str | None:
        rest = lines[line][column:].strip()
        return rest.lstrip("#").strip() if rest.startswith("#") else None

    def walk(node, prefix: str) -> None:
        for key, value in node.value:
            path, column = prefix + str(key.value), key.start_mark.column
            nested = isinstance(value, yaml.MappingNode) and not value.flow_style and value.value
            end = key.end_mark if nested else value.end_mark
            inline = comment_at(end.line, end.column + (1 if nested else 0))  # after the key's colon
            if inline is not None:
                below = end.line + 1
                while below < len(lines) and lines[below].strip().startswith("#") and \
                        lines[below].index("#") > column:
                    inline += " " + lines[below].strip().lstrip("#").strip()
                    below += 1
                found[path] = inline
            else:
                above = key.start_mark.line - 1
                block = []
                while above >= 0 and lines[above].startswith(" " * column + "#") and not lines[above].startswith("# @package"):
                    block.insert(0, lines[above].strip().lstrip("#").strip())
                    above -= 1
                if block and above >= 0:  # a block that is not the file's own header
                    found[path] = _sentence(block)
            if nested:
                walk(value, path + ".")

    root = yaml.compose(text)
    if isinstance(root, yaml.MappingNode):
        walk(root, "")
    return found


def _shown(value) -> str:
    """A value as it is written in an override: [200,200], null, true."""
    if isinstance(value, list):
        return "[" + ",".join(_shown(item) for item in value) + "]"
    return {None: "null", True: "true", False: "false"}.get(value, str(value)) if not isinstance(value, (int, float)) \
        or isinstance(value, bool) else str(value)


def _value(config, path: str):
    for part in path.split("."):
        config = config[part]
    return config


def describe(args: list[str]) -> str | None:
    """`dgm train [GROUP=OPTION …] --help`: the config groups and their options, then every
    setting of the chosen options with its value and the comment its config file gives it.
    None for a command on configs of the user's own (Hydra's help covers those)."""
    flags, overrides = split([arg for arg in args if arg not in ("--help", "-h")])
    if _flag(flags, "--config-dir", "-cd", "--config-path", "-cp") is not None:
        return None
    chosen = []
    for override in parse(overrides):  # a sweep shows the first of its options, or the default value
        if not override.is_sweep_override():
            chosen.append(override.input_line)
        elif is_group(override.key_or_group) and override.value_type in (
                ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP, ValueType.RANGE_SWEEP):
            chosen.append(f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}")
    with _configs(flags) as (config_name, _):
        loader = GlobalHydra.instance().config_loader()
        composed = compose(config_name, overrides=chosen, return_hydra_config=True)
        defaults = [d for d in loader.compute_defaults_list(config_name, chosen, RunMode.RUN).defaults
                    if d.config_path and not d.config_path.startswith("hydra")]
        groups = {group: loader.get_group_options(group) for group in loader.list_groups("") if group != "hydra"}
    config = OmegaConf.to_container(composed)
    intro = composed.hydra.help.header
    config.pop("hydra")
    described, sections = {}, {}
    for default in defaults:  # in the order they compose: a later file describes a key anew
        text = (resources.files(CONFIGS) / f"{default.config_path}.yaml").read_text()
        prefix = default.package + "." if default.package else ""
        described.update({prefix + key: line for key, line in comments(text).items()})
        group, _, option = default.config_path.rpartition("/")
        if group:  # the last of a package's files is its option (trainer=em extends trainer/default)
            sections[default.package or group] = (f"{group}={option}", header(text))
    lines = [intro, "", "usage: dgm train [GROUP=OPTION ...] [KEY=VALUE ...]   (-m: a sweep, one run for each "
             "combination of comma-separated values)", "", "Config groups (GROUP=OPTION):"]
    lines += [f"{group}: {', '.join(options)}" for group, options in groups.items()]
    settings_by_section: dict[str, list[str]] = {}
    shown = set()
    for path in paths(config):
        section = path.split(".")[0] if path.split(".")[0] in sections else ""
        settings_by_section.setdefault(section, []).append(path)
    for section in [*sections, ""]:
        title, about = sections.get(section, ("every run", header(
            (resources.files(CONFIGS) / f"{config_name}.yaml").read_text())))
        lines += ["", f"{title}: {about}".rstrip(": ")]
        for path in settings_by_section.get(section, []):
            parts = path.split(".")
            for node in (".".join(parts[:end]) for end in range(1, len(parts))):
                if node in described and node not in shown:  # a described node of settings, once
                    lines.append(f"{'  ' + node + '.…':<36} {described[node]}")
                    shown.add(node)
            setting = f"  {path}={_shown(_value(config, path))}"
            lines.append(f"{setting:<36} {described[path]}" if path in described else setting)
    lines += ["", "Another option's settings: put it before --help, as in dgm train model=sbn --help (or "
              "dataset=numpy --help).", "The composed config: dgm train --cfg job; Hydra's own flags: dgm train --hydra-help."]
    return "\n".join(lines) + "\n"
