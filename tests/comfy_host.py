"""The real ComfyUI host for tests: upstream ComfyUI 0.3.64 with its pinned Vue frontend.

``scripts/setup_env.sh test`` puts it in ``.hosts/ComfyUI`` (with the host installer in ``$SAEURON_COMFY_HOSTS`` or
``../shared/hosts``, else cloned from upstream). ``start()`` copies that tree to a temp dir, imports it with
``--cpu`` and loads this repo as a custom-node pack the way ComfyUI does (``nodes.load_custom_node``).
``tiny_model()`` and ``tiny_clip()`` load the tiny diffusers pipeline's UNet and text encoder through the pack's own
loader (``nodes/loader.py``, as Load Diffusers Model does). ``ComfyServer`` runs ``main.py`` of a fresh copy as a
real server. The pack's ComfyUI-free modules (``nodes/workflow_format.py``, ``nodes/demo_files.py``) are loaded by
path (``plain_pack_module``): the pack's ``nodes`` package is not importable by name beside ComfyUI's own ``nodes``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HOSTS = Path(os.environ.get("SAEURON_HOSTS_DIR", ROOT / ".hosts"))
NEWEST_FRONTEND = "1.58.1"  # scripts/setup_env.sh installs it beside the pinned one
PACK_NAME = "comfyui-saeuron"
_STATE: dict = {}


def comfy_source() -> Path:
    tree = HOSTS / "ComfyUI"
    if not (tree / "comfyui_version.py").is_file():
        raise RuntimeError(f"ComfyUI 0.3.64 is not installed in {tree}; run scripts/setup_env.sh test")
    return tree


def newest_frontend() -> Path:
    """The static files of the newest frontend (served with ``--front-end-root``)."""
    static = HOSTS / f"frontend-{NEWEST_FRONTEND}" / "static"
    if not (static / "index.html").is_file():
        raise RuntimeError(f"frontend {NEWEST_FRONTEND} is not installed in {static.parent}; run scripts/setup_env.sh test")
    return static


def copy_host(dest: Path) -> Path:
    shutil.copytree(comfy_source(), dest, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "extra_model_paths.yaml").unlink(missing_ok=True)
    return dest


def start(tmp_root: Path):
    """Import ComfyUI (CPU) from a copy under ``tmp_root`` and load the pack as ComfyUI does.

    Returns the pack's module; its nodes are in ComfyUI's ``nodes.NODE_CLASS_MAPPINGS`` (see ``node_class``).
    """
    if "pack" in _STATE:
        return _STATE["pack"]
    import asyncio

    host = copy_host(tmp_root / "ComfyUI")
    sys.path.insert(0, str(host))
    from comfy.cli_args import args

    args.cpu = True
    import folder_paths

    folder_paths.models_dir = str(tmp_root / "models")
    (tmp_root / "models" / "sae").mkdir(parents=True)
    folder_paths.folder_names_and_paths["sae"] = ([str(tmp_root / "models" / "sae")], {".safetensors"})
    import nodes

    nodes_dir = tmp_root / "custom_nodes"
    nodes_dir.mkdir()
    (nodes_dir / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
    asyncio.run(nodes.init_builtin_extra_nodes())  # comfy_extras (SolidMask, FluxGuidance...), as the server has
    before = set(nodes.NODE_CLASS_MAPPINGS)
    if not asyncio.run(nodes.load_custom_node(str(nodes_dir / PACK_NAME))):
        raise RuntimeError("ComfyUI could not load the pack (see the log above)")
    pack = sys.modules[str(nodes_dir / PACK_NAME).replace(".", "_x_")]  # ComfyUI's name for the module
    _STATE.update(pack=pack, host=host, models=tmp_root / "models",
                  node_ids=sorted(set(nodes.NODE_CLASS_MAPPINGS) - before))
    return pack


def pack_module(name: str):
    """One of the pack's submodules (e.g. ``"nodes.routes"``) as ComfyUI imported it (after ``start``)."""
    return sys.modules[f"{_STATE['pack'].__name__}.{name}"]


def node_class(node_id: str):
    """The class ComfyUI registered for one of the pack's node ids (after ``start``)."""
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[node_id]


def _loader():
    return pack_module("nodes.loader")


# SD 1.x's noise schedule and latent scale, as the tiny pipeline's scheduler and VAE have them.
SD_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon"}
SD_LATENT_SCALE = 0.18215


def tiny_model(diffusers_unet):
    """A ComfyUI ModelPatcher with the diffusers UNet's weights, loaded by the pack's ``load_unet`` (after ``start``)
    from a diffusers folder: the UNet, SD 1.x's scheduler and latent scale."""
    import json
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="tiny-unet-", dir=_STATE["models"].parent))
    diffusers_unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    for part, config in (("scheduler/scheduler_config.json", SD_SCHEDULER),
                         ("vae/config.json", {"scaling_factor": SD_LATENT_SCALE})):
        (folder / part).parent.mkdir()
        (folder / part).write_text(json.dumps(config))
    return _loader().load_unet(folder)


def tiny_clip(pipe, folder: Path):
    """A ComfyUI ``CLIP`` (its own SD1 tokenizer and text-model classes) with the tiny pipeline's text encoder, loaded
    by the pack's ``load_clip`` (after ``start``) from ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe.tokenizer.save_pretrained(str(folder / "tokenizer"))
    pipe.text_encoder.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    return _loader().load_clip(folder)


class ComfyServer:
    """``main.py --cpu`` of a fresh ComfyUI copy on a free loopback port, with this pack as a custom node.

    ``pack_only``: a fresh install, as a user has it after cloning the pack into ``ComfyUI/custom_nodes``: no
    model folder made or configured (``models`` is ComfyUI's own). Otherwise the pack comes in through
    ``--extra-model-paths-config`` (a ``custom_nodes:`` entry) and model folders (``sae``, ``checkpoints``) point
    into ``root/models``. ``front_end_root`` serves another frontend (e.g. ``newest_frontend()``) instead of the
    pinned one. Stopped by its PID.
    """

    def __init__(self, root: Path, front_end_root: Path | None = None, pack_only: bool = False) -> None:
        import socket

        self.root = root
        self.front_end_root = front_end_root
        self.host_dir = copy_host(root / "ComfyUI")
        self.config = None
        if pack_only:
            self.models = self.host_dir / "models"
            (self.host_dir / "custom_nodes" / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
        else:
            self.models = root / "models"
            (self.models / "sae").mkdir(parents=True, exist_ok=True)
            (self.models / "diffusers").mkdir(parents=True, exist_ok=True)
            nodes_dir = root / "custom_nodes"
            nodes_dir.mkdir()
            (nodes_dir / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
            self.config = root / "extra_model_paths.yaml"
            self.config.write_text(
                "saeuron_tests:\n"
                f"  base_path: {self.models}\n"
                "  sae: sae\n"
                "  diffusers: diffusers\n"
                "  checkpoints: checkpoints\n"
                f"  custom_nodes: {nodes_dir}\n")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def __enter__(self) -> "ComfyServer":
        import os
        import subprocess
        import time

        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = open(self.root / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             *(["--extra-model-paths-config", str(self.config)] if self.config else []),
             "--output-directory", str(self.root / "output"),
             "--input-directory", str(self.root / "input"), "--temp-directory", str(self.root),
             *(["--front-end-root", str(self.front_end_root)] if self.front_end_root else [])],
            cwd=self.host_dir, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{(self.root / 'server.log').read_text()[-3000:]}")
            try:
                self.get("/object_info/SAeUronLoadSAE")
                return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError("ComfyUI did not start within 180 s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except Exception:
                self.proc.kill()
        self.log.close()

    def get(self, path: str):
        import json
        import urllib.request

        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        import json
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """POST an API-format graph to /prompt and wait for its /history entry."""
        import time

        status, reply = self.post("/prompt", {"prompt": prompt})
        if status != 200:
            raise AssertionError(f"/prompt refused the graph: {reply}")
        pid = reply["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{pid}")
            if pid in history and history[pid].get("status", {}).get("completed") is not None:
                return history[pid]
            if pid in history and history[pid].get("outputs") is not None and "status" not in history[pid]:
                return history[pid]
            time.sleep(0.3)
        raise AssertionError(f"prompt {pid} did not finish in {timeout} s")


def tiny_vae():
    """A ComfyUI ``VAE`` (its own AutoencoderKL class, random weights) decoding 4x8x8 latents to 16x16 images."""
    import comfy.sd

    config = {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}
    with torch.no_grad():
        vae = comfy.sd.VAE(sd={}, config=config)
        vae.upscale_ratio = vae.downscale_ratio = 2  # this small autoencoder has one down/up sampling step
        gen = torch.Generator().manual_seed(0)
        for p in vae.first_stage_model.parameters():  # ComfyUI's ops leave weights uninitialised
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return vae


def expected_images(api: dict) -> dict[str, tuple[int, int]]:
    """``{SaveImage node id: (image count, side in pixels)}`` of one of the project's workflows (API format).

    Every SaveImage is fed by an ImageScaleBy of a decoded batch (``batch_size`` of node 5) or of the
    Feature Inspector's single overlay; node 5 sets the image size.
    """
    out = {}
    for node_id, node in api.items():
        if node["class_type"] != "SaveImage":
            continue
        scale = api[node["inputs"]["images"][0]]
        assert scale["class_type"] == "ImageScaleBy", f"SaveImage {node_id} is not fed by ImageScaleBy"
        source = api[scale["inputs"]["image"][0]]
        count = 1 if source["class_type"] == "SAeUronFeatureInspector" else api["5"]["inputs"]["batch_size"]
        out[node_id] = (count, int(api["5"]["inputs"]["width"] * scale["inputs"]["scale_by"]))
    return out


DEMO_ASSETS = ROOT / "demo_assets"


def plain_pack_module(name: str):
    """The pack's ``nodes/<name>.py`` loaded by path, for modules that import nothing from ComfyUI (usable before
    ``start`` and without it)."""
    import importlib.util

    key = f"plain:{name}"
    if key not in _STATE:
        spec = importlib.util.spec_from_file_location(f"saeuron_pack_{name}", ROOT / "nodes" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _STATE[key] = module
    return _STATE[key]


def demo_files():
    """The pack's ``nodes/demo_files.py`` (the names under which it offers its demo model and SAEs)."""
    return plain_pack_module("demo_files")


# The workflow-file helpers of nodes/workflow_format.py (UI <-> API format, combo choices), for the tests.
combo_choices = plain_pack_module("workflow_format").combo_choices
is_widget = plain_pack_module("workflow_format").is_widget
ui_to_api = plain_pack_module("workflow_format").ui_to_api


TINY_FLUX = {"patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
             "guidance_embeds": False, "axes_dims_rope": [4, 6, 6]}
TINY_SD3 = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 64,
            "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 128,
            "pooled_projection_dim": 16, "out_channels": 4, "pos_embed_max_size": 16}


def tiny_dit(diffusers_model):
    """A ComfyUI ModelPatcher (its own FLUX or MMDiT class and model sampling) with the weights of a tiny
    diffusers ``FluxTransformer2DModel`` / ``SD3Transformer2DModel``, converted by ComfyUI's own key map."""
    import comfy.latent_formats
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models

    cfg = diffusers_model.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    if type(diffusers_model).__name__ == "FluxTransformer2DModel":
        unet_config = {"image_model": "flux", "in_channels": cfg.in_channels // 4, "out_channels": cfg.in_channels // 4,
                       "vec_in_dim": cfg.pooled_projection_dim, "context_in_dim": cfg.joint_attention_dim,
                       "hidden_size": width, "mlp_ratio": 4.0, "num_heads": cfg.num_attention_heads,
                       "depth": cfg.num_layers, "depth_single_blocks": cfg.num_single_layers,
                       "axes_dim": list(cfg.axes_dims_rope), "theta": 10000, "patch_size": 2, "qkv_bias": True,
                       "guidance_embed": False}
        config_cls = comfy.supported_models.Flux
        latent = type("TinyFluxLatent", (comfy.latent_formats.LatentFormat,), {"latent_channels": unet_config["in_channels"]})
    else:
        unet_config = {"in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "patch_size": cfg.patch_size,
                       "depth": cfg.num_layers, "num_blocks": cfg.num_layers, "adm_in_channels": cfg.pooled_projection_dim,
                       "pos_embed_max_size": cfg.pos_embed_max_size, "num_patches": cfg.pos_embed_max_size ** 2,
                       "input_size": None,
                       "context_embedder_config": {"target": "torch.nn.Linear", "params": {
                           "in_features": cfg.joint_attention_dim, "out_features": width}}}
        config_cls = comfy.supported_models.SD3
        latent = type("TinySD3Latent", (comfy.latent_formats.LatentFormat,), {"latent_channels": cfg.in_channels})
    tiny_cls = type("Tiny" + config_cls.__name__, (config_cls,), {"latent_format": latent, "unet_config": {},
                                                                   "sampling_settings": dict(config_cls.sampling_settings)})
    model = tiny_cls(dict(unet_config, dtype=torch.float32)).get_model({}, device="cpu")
    # A copy: the conversion writes some tensors in place (it would swap the diffusers model's own weights).
    source = {k: v.detach().clone() for k, v in diffusers_model.state_dict().items()}
    converted = comfy.model_detection.convert_diffusers_mmdit(source, "diffusion_model.")
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if k.startswith("diffusion_model.")]
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
