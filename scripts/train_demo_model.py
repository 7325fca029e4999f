"""Train the demo pixel-space diffusion model (UNet + tiny CLIP text encoder) on CPU, resumably.

Every step draws fresh procedural images from a seed derived from (seed, step), so training needs
no data on disk and a resumed run sees exactly the batches an uninterrupted one would.
State (weights, EMA, AdamW moments) lives in one safetensors file with JSON metadata; the EMA
weights are exported as the shippable model folder at every checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time


import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saeuron_demo.dataset import STYLES, OBJECTS, generate, make_prompt, to_model_range
from saeuron_demo.model import PREDICTION_TYPE, UNET_CONFIG, build_unet, count_params, sample_scheduler, train_scheduler
from saeuron_demo.pipeline import write_model_index
from saeuron_demo.schedule import lr_at, step_seed
from saeuron_demo.textenc import build_text_encoder, build_tokenizer, tokenize, write_tokenizer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_assets", help="output folder (train_state/, model/, train_log.txt)")
    p.add_argument("--total-steps", type=int, default=4500)
    p.add_argument("--stop-at", type=int, default=None, help="exit after this step (default: total-steps)")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument(
        "--restart-at",
        type=int,
        default=0,
        help="warm restart: the lr schedule (warm-up, cosine decay to --total-steps) and the EMA start again at this step",
    )
    p.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        default=None,
        help="training target (default: the resumed state's, v_prediction for a new run); changing it fine-tunes",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="start from an exported model folder (its EMA weights; AdamW moments start at zero) when --out has no "
        "train_state yet; needs --restart-at set to the model's step",
    )
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--threads-file",
        default=None,
        help="file holding a thread count (0 pauses), re-read before every step (lets a long run yield cores to other jobs)",
    )
    return p.parse_args()


class Trainer:
    """Holds models, EMA copies, optimizer and the (de)serialisation of the training state."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.tokenizer = build_tokenizer()
        self.unet = build_unet(seed=a.seed)
        self.te = build_text_encoder(self.tokenizer, seed=a.seed)
        self.ema_unet = build_unet(seed=a.seed)
        self.ema_te = build_text_encoder(self.tokenizer, seed=a.seed)
        self.ema_unet.load_state_dict(self.unet.state_dict())
        self.ema_te.load_state_dict(self.te.state_dict())
        for m in (self.ema_unet, self.ema_te):
            m.requires_grad_(False).eval()
        self.params = list(self.unet.parameters()) + list(self.te.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=a.lr, betas=(0.9, 0.999), weight_decay=0.01)
        self.prediction_type = a.prediction_type or PREDICTION_TYPE
        sched = train_scheduler(self.prediction_type)
        self.alphas_cumprod = sched.alphas_cumprod.float()
        self.num_t = sched.config.num_train_timesteps
        self.step = 0
        self.initialised = False  # set when a new cycle starts from an exported model (--init-from)
        # Only 64 distinct prompts plus "": tokenize them once.
        prompts = [make_prompt(o, s) for o in OBJECTS for s in STYLES] + [""]
        self.prompt_ids = dict(zip(prompts, tokenize(self.tokenizer, prompts)))
        self.state_path = os.path.join(a.out, "train_state", "state.safetensors")
        self.config = {
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
            "text_encoder": self.te.config.to_dict(),
            "seed": a.seed,
            "batch": a.batch,
            "lr": a.lr,
            "warmup": a.warmup,
            "total_steps": a.total_steps,
            "ema": a.ema,
            "snr_gamma": a.snr_gamma,
            "p_uncond": a.p_uncond,
            "prediction_type": self.prediction_type,
            "restarts": [a.restart_at] if a.restart_at else [],
        }

    # ------------------------------------------------------------ state I/O

    def _modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "text_encoder": self.te, "ema_unet": self.ema_unet, "ema_text_encoder": self.ema_te}

    def save_state(self) -> None:
        """Write weights, EMA and AdamW state atomically to one safetensors file."""
        tensors: dict[str, torch.Tensor] = {}
        for prefix, mod in self._modules().items():
            for k, v in mod.state_dict().items():
                tensors[f"{prefix}.{k}"] = v.detach().contiguous()
        for i, p in enumerate(self.params):
            st = self.opt.state.get(p, {})
            if st:
                tensors[f"opt.{i}.exp_avg"] = st["exp_avg"].contiguous()
                tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
                tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
        meta = {"step": str(self.step), "config": json.dumps(self.config), "format": "saeuron-demo-train-state-v1"}
        os.makedirs(os.path.dirname(self.state_path), exist_ok=True)
        tmp = self.state_path + ".tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, self.state_path)

    def load_state(self) -> bool:
        """Resume from the state file if present (else from --init-from); returns whether it did."""
        if not os.path.exists(self.state_path):
            return self.init_from_model() if self.a.init_from else False
        with safe_open(self.state_path, framework="pt") as f:
            meta = f.metadata()
            saved_cfg = json.loads(meta["config"])
            if saved_cfg["unet"] != self.config["unet"]:
                raise SystemExit(f"UNet config in {self.state_path} differs from the current one; refusing to resume")
            saved_pred = saved_cfg.get("prediction_type", "epsilon")
            if self.a.prediction_type is None:
                self.prediction_type = self.config["prediction_type"] = saved_pred
            elif saved_pred != self.prediction_type and not self.a.restart_at:
                raise SystemExit(
                    f"{self.state_path} was trained for {saved_pred}; switching to {self.prediction_type} "
                    "is a fine-tune: give --restart-at"
                )
            history = saved_cfg.get("history", [])
            if saved_pred != self.prediction_type or saved_cfg.get("restarts", []) != self.config["restarts"]:
                done = {"total_steps": saved_cfg["total_steps"], "lr": saved_cfg["lr"], "prediction_type": saved_pred}
                history = history + [{**done, "restarts": saved_cfg.get("restarts", [])}]
            self.config["history"] = history
            if "init_from" in saved_cfg:
                self.config["init_from"] = saved_cfg["init_from"]
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for prefix, mod in self._modules().items():
            sd = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            mod.load_state_dict(sd)
        for i, p in enumerate(self.params):
            if f"opt.{i}.exp_avg" in tensors:
                self.opt.state[p] = {
                    "step": tensors[f"opt.{i}.step"].reshape(()),
                    "exp_avg": tensors[f"opt.{i}.exp_avg"],
                    "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"],
                }
        self.step = int(meta["step"])
        if self.a.restart_at and self.step == self.a.restart_at:
            # A new cycle (or a new target): its EMA starts from the live weights, not the old average.
            self.ema_unet.load_state_dict(self.unet.state_dict())
            self.ema_te.load_state_dict(self.te.state_dict())
        return True

    def init_from_model(self) -> bool:
        """Start a new cycle from an exported model folder: its weights become live and EMA weights."""
        folder = self.a.init_from
        with open(os.path.join(folder, "training.json"), encoding="utf-8") as f:
            done = json.load(f)
        if done["unet"] != self.config["unet"]:
            raise SystemExit(f"UNet config in {folder} differs from the current one; refusing to start from it")
        if self.a.restart_at != done["step"]:
            raise SystemExit(f"{folder} is at step {done['step']}: give --restart-at {done['step']} to start a cycle there")
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).state_dict()
        te = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).state_dict()
        for mod, sd in ((self.unet, unet), (self.ema_unet, unet), (self.te, te), (self.ema_te, te)):
            mod.load_state_dict(sd)
        if self.a.prediction_type is None:
            self.prediction_type = self.config["prediction_type"] = done["prediction_type"]
        cycle = {k: done[k] for k in ("total_steps", "lr", "prediction_type", "restarts")}
        self.config["history"] = done.get("history", []) + [cycle]
        self.config["init_from"] = os.path.normpath(folder)
        self.step = done["step"]
        self.initialised = True
        return True

    def export_model(self) -> None:
        """Export EMA weights as demo_assets/model/{unet,text_encoder,tokenizer,scheduler}/."""
        final = os.path.join(self.a.out, "model")
        tmp, old = final + ".tmp", final + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        self.ema_unet.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
        self.ema_te.save_pretrained(os.path.join(tmp, "text_encoder"), safe_serialization=True)
        write_tokenizer(os.path.join(tmp, "tokenizer"))
        sample_scheduler(self.prediction_type).save_pretrained(os.path.join(tmp, "scheduler"))
        write_model_index(tmp)
        with open(os.path.join(tmp, "training.json"), "w") as f:
            json.dump({"step": self.step, **self.config}, f, indent=1)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------ training

    @torch.no_grad()
    def ema_update(self) -> None:
        k = self.step - self.a.restart_at
        decay = min(self.a.ema, (1 + k) / (10 + k))
        for src, dst in ((self.unet, self.ema_unet), (self.te, self.ema_te)):
            for ps, pd in zip(src.parameters(), dst.parameters()):
                pd.lerp_(ps, 1 - decay)

    def train_step(self) -> float:
        a = self.a
        seed = step_seed(a.seed, self.step)
        imgs, _, _, prompts = generate(a.batch, seed)
        gen = torch.Generator().manual_seed(seed)
        drop = torch.rand(a.batch, generator=gen) < a.p_uncond
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        ids = torch.stack([self.prompt_ids[p] for p in prompts])
        x0 = to_model_range(imgs)
        t = torch.randint(0, self.num_t, (a.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        ac = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        snr = ac.view(-1) / (1 - ac.view(-1))
        if self.prediction_type == "epsilon":
            target, weight = noise, torch.clamp(snr, max=a.snr_gamma) / snr  # min-SNR weights
        else:
            target = ac.sqrt() * noise - (1 - ac).sqrt() * x0
            weight = torch.clamp(snr, max=a.snr_gamma) / (snr + 1)

        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, a)
        ctx = self.te(ids).last_hidden_state
        pred = self.unet(xt, t, encoder_hidden_states=ctx).sample
        loss = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        loss = (loss * weight).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.step += 1
        self.ema_update()
        return loss.item()


def _follow_threads_file(path: str | None) -> None:
    """Apply the thread count in `path`; 0 pauses training until the file says otherwise."""
    while path and os.path.exists(path):
        try:
            n = int(open(path).read().strip())
        except ValueError:
            return
        if n >= 1:
            if n != torch.get_num_threads():
                torch.set_num_threads(n)
            return
        time.sleep(5)


def main() -> None:
    a = parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    tr = Trainer(a)
    resumed = tr.load_state()
    stop = min(a.stop_at if a.stop_at is not None else a.total_steps, a.total_steps)
    log_path = os.path.join(a.out, "train_log.txt")
    how = f"started from {a.init_from} at" if tr.initialised else "resumed at" if resumed else "started"
    log = open(log_path, "a", buffering=1)
    msg = (
        f"# {how} step {tr.step} (stop {stop}, total {a.total_steps}); "
        f"unet {count_params(tr.unet)} params, text encoder {count_params(tr.te)} params, threads {a.threads}, "
        f"pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    print(msg, flush=True)
    log.write(msg + "\n")
    tr.unet.train()
    tr.te.train()
    losses: list[float] = []
    t0 = time.time()
    while tr.step < stop:
        paused = time.time()
        _follow_threads_file(a.threads_file)
        t0 += time.time() - paused
        losses.append(tr.train_step())
        if tr.step % a.log_every == 0:
            dt = (time.time() - t0) / len(losses)
            line = (
                f"step {tr.step} loss {sum(losses) / len(losses):.4f} lr {lr_at(tr.step - 1, a):.2e} "
                f"s/step {dt:.2f} threads {torch.get_num_threads()}"
            )
            print(line, flush=True)
            log.write(line + "\n")
            losses, t0 = [], time.time()
        if tr.step % a.ckpt_every == 0 or tr.step == stop:
            tr.save_state()
            tr.export_model()
            print(f"checkpoint at step {tr.step}", flush=True)
    log.close()


if __name__ == "__main__":
    main()
