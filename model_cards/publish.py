"""Publishing a checkpoint or adapter folder to the Hub; every check runs before anything leaves the machine.

    hf-effattn publish runs/smollm2-gdn --repo-id ORG/smollm2-gdn --dry-run   # checks, then lists what would go
    hf-effattn publish runs/smollm2-gdn --repo-id ORG/smollm2-gdn             # checks, then one upload commit

A checkpoint folder needs config.json with auto_map, every python file the model code imports, safetensors weights
only, tokenizer files, a model card that parses, and no local paths in its metadata. An adapter folder (PEFT)
needs adapter_config.json naming its base by hub id, safetensors adapter weights, tokenizer files and a card.
The upload is a single `upload_folder` commit of exactly the listed files, so a failure leaves the repository as
it was.
"""

import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .render import REPO_PLACEHOLDER, CardError, check_card, find_local_paths, is_hub_id

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
METADATA_SUFFIXES = (".json", ".md", ".yaml", ".yml")
# token lists rather than metadata: path-like tokens in a vocabulary are not paths
VOCABULARY_FILES = {"tokenizer.json", "vocab.json", "merges.txt", "vocab.txt"}
# one of these sets of files makes a loadable tokenizer
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",),
                       ("spiece.model",))
# transformers' own patterns for the relative imports of remote code (dynamic_module_utils.get_relative_imports)
_RELATIVE_IMPORTS = (re.compile(r"^\s*import\s+\.(\S+)\s*$", re.MULTILINE), re.compile(r"^\s*from\s+\.(\S+)\s+import", re.MULTILINE))
_SNIPPET_REPO = re.compile(r'^repo, revision = "([^"]+)"', re.MULTILINE)
_TRUE = {"1", "ON", "YES", "TRUE"}


class PublishError(RuntimeError):
    """A folder that must not be uploaded as it is, or an upload that could not happen; nothing was uploaded."""


@dataclass
class Plan:
    """What would be uploaded: the folder's kind ("checkpoint" or "adapter") and (relative path, bytes) per file."""

    folder: Path
    kind: str
    files: list[tuple[str, int]]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def folder_files(folder: Path) -> list[str]:
    """Every file that would be uploaded, relative to `folder`: hidden files and folders and caches are left out."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        if path.is_file() and path.suffix != ".pyc":
            files.append(relative.as_posix())
    return files


def _code_problems(folder: Path, auto_map: dict) -> list[str]:
    """Missing python files among those auto_map names and, transitively, those they import relatively."""
    problems, seen = [], set()
    # "module.Class", or "org/repo--module.Class" for code that lives in another repository
    queue = [(value.rsplit(".", 1)[0], "config.json's auto_map") for value in auto_map.values()
             if isinstance(value, str) and "--" not in value]
    while queue:
        module, named_by = queue.pop(0)
        if module in seen:
            continue
        seen.add(module)
        path = folder / f"{module}.py"
        if not path.is_file():
            problems.append(f"{named_by} needs {module}.py, which is missing: copy the model code into the folder "
                            "(hf_effattn.checkpoint.save_checkpoint copies every file of REMOTE_CODE_FILES)")
            continue
        source = path.read_text(encoding="utf-8")
        for pattern in _RELATIVE_IMPORTS:
            for name in pattern.findall(source):
                queue.append((name.split(".")[0], f"{module}.py (`from .{name} import ...`)"))
    return problems


def _local_path_problems(folder: Path, files: list[str]) -> list[str]:
    problems = []
    for name in files:
        if not name.endswith(METADATA_SUFFIXES) or Path(name).name in VOCABULARY_FILES:
            continue
        paths = find_local_paths((folder / name).read_text(encoding="utf-8", errors="replace"))
        if paths:
            shown = ", ".join(repr(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            problems.append(f"{name} holds the local path(s) {shown}: replace them with hub ids or file names")
    return problems


def _tokenizer_problems(files: set[str]) -> list[str]:
    if "tokenizer_config.json" in files and any(set(names) <= files for names in TOKENIZER_FILE_SETS):
        return []
    return [("no tokenizer files (tokenizer_config.json with tokenizer.json, tokenizer.model or a vocabulary): save "
             "them with tokenizer.save_pretrained(DIR)")]


def _card_problems(folder: Path, files: set[str], kind: str, repo_id: str | None) -> list[str]:
    if "README.md" not in files:
        return [("no README.md model card: render one with `hf-effattn card DIR --repo-id ORG/NAME --output "
                 "DIR/README.md`")]
    text = (folder / "README.md").read_text(encoding="utf-8")
    problems = []
    try:
        check_card(text, library_name="peft" if kind == "adapter" else "transformers")
    except CardError as error:
        return [str(error)]
    if f"{REPO_PLACEHOLDER}/" in text:
        problems.append(f"README.md still names the placeholder repository '{REPO_PLACEHOLDER}/...': render the card "
                        f"with `hf-effattn card ... --repo-id {repo_id or 'ORG/NAME'}`")
    elif repo_id:
        # the snippet of cards from `hf-effattn card` names the repository once
        named = _SNIPPET_REPO.search(text)
        if named and named.group(1) != repo_id:
            problems.append(f"README.md's usage snippets load {named.group(1)}, not {repo_id}: render the card with "
                            f"`hf-effattn card ... --repo-id {repo_id}`")
    return problems


def check_folder(folder, repo_id: str | None = None) -> Plan:
    """Checks that `folder` can be published as it is; raises PublishError listing every problem and its fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder: pass a checkpoint or adapter folder.")
    files = folder_files(folder)
    present = set(files)
    problems = []
    if "config.json" in present:
        kind = "checkpoint"
        try:
            config = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError as error:
            raise PublishError(f"{folder}/config.json is not valid JSON ({error}).") from None
        auto_map = config.get("auto_map") or {}
        if "AutoModelForCausalLM" not in auto_map:
            problems.append("config.json has no auto_map for AutoModelForCausalLM: transformers cannot find the model "
                            "code with trust_remote_code=True; save the model with "
                            "hf_effattn.checkpoint.save_checkpoint, which writes auto_map and copies the code")
        problems += _code_problems(folder, auto_map)
        if not any(name.endswith(".safetensors") for name in files):
            problems.append("no .safetensors weights: save the model with save_pretrained(DIR, "
                            "safe_serialization=True)")
        adapter = sorted(present & {ADAPTER_CONFIG, *ADAPTER_WEIGHTS})
        if adapter:
            problems.append(f"{adapter} sit beside the full weights, so transformers would load the adapter instead "
                            "(peft#1381): publish the merged model without them, or the adapter on its own")
    elif ADAPTER_CONFIG in present:
        kind = "adapter"
        adapter_config = json.loads((folder / ADAPTER_CONFIG).read_text())
        base = adapter_config.get("base_model_name_or_path")
        if not is_hub_id(base) or Path(str(base)).expanduser().exists():
            problems.append(f"{ADAPTER_CONFIG}: base_model_name_or_path is {base!r}, not the base model's hub id: "
                            "pass --base-repo-id ORG/NAME (it runs hf_effattn.finetuning.rewrite_adapter_base)")
        if "adapter_model.safetensors" not in present:
            problems.append("no adapter_model.safetensors: save the adapter with save_pretrained(DIR)")
    else:
        raise PublishError(f"{folder} holds neither config.json (a checkpoint) nor {ADAPTER_CONFIG} (a PEFT adapter): "
                           "pass the output folder of `hf-effattn convert`, `merge` or `finetune`.")
    pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        problems.append(f"pickle files {pickles}: weights must be safetensors only (loading pickles runs arbitrary "
                        "code); delete them, or convert them with save_pretrained(DIR, safe_serialization=True)")
    problems += _tokenizer_problems(present)
    problems += _card_problems(folder, present, kind, repo_id)
    problems += _local_path_problems(folder, files)
    if problems:
        raise PublishError(f"Not published: {folder} fails {len(problems)} check(s); nothing was uploaded.\n"
                           + "\n".join(f"- {problem.rstrip('.')}." for problem in problems))
    return Plan(folder, kind, [(name, (folder / name).stat().st_size) for name in files])


def describe(plan: Plan, repo_id: str, revision: str | None, dry_run: bool = True) -> str:
    action = "would upload" if dry_run else "uploading"
    lines = [(f"{action} the {plan.kind} {plan.folder} to https://huggingface.co/{repo_id} (branch "
              f"{revision or 'main'}): {len(plan.files)} files, {_size(plan.total_bytes)}")]
    width = max(len(_size(size)) for _, size in plan.files)
    lines += [f"  {_size(size):>{width}}  {name}" for name, size in plan.files]
    return "\n".join(lines)


def is_offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def _network_errors() -> tuple[type, ...]:
    """Exceptions that mean "the Hub could not be reached" (the HTTP client's transport errors, OS errors)."""
    errors = [OSError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            client = importlib.import_module(module)
        except ImportError:
            continue
        errors.append(getattr(client, "TransportError", None) or getattr(client, "ConnectionError", OSError))
    return tuple(errors)


def publish(folder, repo_id: str, *, dry_run: bool = False, revision: str | None = None,
            commit_message: str | None = None, private: bool = False, token: str | None = None,
            base_repo_id: str | None = None, log=print) -> str | None:
    """Checks `folder`, then uploads it to `repo_id` in one commit; returns the commit URL (None for a dry run).

    `base_repo_id` first points an adapter folder's metadata at its base model's hub id (in place).
    """
    if not is_hub_id(repo_id):
        raise PublishError(f"--repo-id {repo_id!r} is not a hub repository id: expected 'org/name'.")
    folder = Path(folder)
    if base_repo_id:
        if not (folder / ADAPTER_CONFIG).is_file():
            raise PublishError(f"--base-repo-id applies to adapter folders; {folder} has no {ADAPTER_CONFIG}.")
        from hf_effattn.finetuning import rewrite_adapter_base

        rewrite_adapter_base(folder, base_repo_id)
        log(f"pointed the adapter's metadata at its base {base_repo_id}")
    plan = check_folder(folder, repo_id)
    log(describe(plan, repo_id, revision, dry_run))
    if dry_run:
        log("dry run: every check passed; nothing was uploaded")
        return None
    if is_offline():
        raise PublishError("HF_HUB_OFFLINE is set, so the Hub cannot be reached: nothing was uploaded. Unset it to "
                           "publish, or pass --dry-run to check the folder only.")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), revision=revision,
            allow_patterns=[name for name, _ in plan.files],
            commit_message=commit_message or f"Upload {folder.resolve().name} with hf_effattn",
        )
    except HfHubHTTPError as error:
        raise PublishError(f"The Hub refused the upload ({str(error).splitlines()[0]}): nothing was uploaded. Log in "
                           "with `hf auth login` or set HF_TOKEN, and check that you may write to "
                           f"{repo_id}.") from None
    except _network_errors() as error:
        raise PublishError(f"Cannot reach the Hub ({type(error).__name__}: {error}): nothing was uploaded (the upload "
                           "is one commit, so the repository is as it was). Retry when online.") from None
    log(f"published: {info.commit_url}")
    return info.commit_url
