"""Run the MetaRM stage on synthetic judgments and record its held-out logits (torchrun, any layout).

``--phase train`` trains from scratch; ``--phase resume`` runs the same command again on the same run
folder, which resumes from the final checkpoint (no further steps). Both write the held-out judgments'
MetaRM logits computed by ``metarm_logits`` on the model the stage returns, so the test can compare them.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=("train", "resume"), required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--samples", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq-length", type=int, default=544)  # the synthetic inputs are 521-541 characters
    ap.add_argument("extra", nargs="*", help="more Hydra overrides")
    args = ap.parse_args()

    import torch

    from megatron_grm.models.metarm import has_metarm_head, metarm_logits
    from megatron_grm.stages.common import load_config
    from megatron_grm.stages.metarm import JUDGMENTS_FILE, is_heldout, read_judgments_file, to_samples, train_metarm

    overrides = ["+experiment=metarm_tiny", "model=tiny", "trainer.load=null", "metarm.random_backbone=true",
                 "data.train=null",
                 f"parallel.tensor_parallel={args.tp}", f"trainer.run_dir={args.run_dir}",
                 f"trainer.max_steps={args.steps}", f"trainer.seq_length={args.seq_length}",
                 f"data.samples=[{args.samples}]", "metarm.eval_interval=20", *args.extra]
    trainer = train_metarm(load_config("metarm", overrides))

    from megatron_grm.data.tokenizer import load_tokenizer

    tok = load_tokenizer("char")
    judgments = read_judgments_file(os.path.join(args.run_dir, JUDGMENTS_FILE))
    heldout = [j for j in judgments if is_heldout(j.example_id, 0.2)]
    samples = to_samples(heldout, tok, trainer.cfg.trainer.seq_length)
    logits = metarm_logits(trainer.model, [ids for ids, _ in samples], 4, tok.pad_id)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"logits": logits, "step": trainer.state.step, "has_head": has_metarm_head(trainer.model),
                       "head_keys": sorted(k for k in trainer.unwrapped.sharded_state_dict() if "metarm" in k),
                       "inputs": [tok.decode(ids[1:]) for ids, _ in samples[:4]]}, f)


if __name__ == "__main__":
    main()
    from megatron_grm.parallel import destroy_parallel

    destroy_parallel()  # gloo's threads still alive at interpreter exit can abort the process (SIGABRT)
