"""An existing QLoRA script with qlora_fast added: one import and one call (marked below).

    python examples/train_with_patch_model.py meta-llama/Llama-3.2-1B-Instruct data.jsonl [max_steps]
"""
import sys

if len(sys.argv) < 3:  # before the slow imports (and the log lines some of them print)
    sys.exit(f"usage: python {sys.argv[0]} MODEL DATA.jsonl [MAX_STEPS]  (MODEL: a hub name or a local "
             "directory; DATA: JSONL with prompt/completion or text fields)")

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

import qlora_fast  # <- added

model_name, data_file = sys.argv[1], sys.argv[2]  # data: JSONL with prompt/completion (or text) fields
max_steps = int(sys.argv[3]) if len(sys.argv) > 3 else 100
gpu = torch.cuda.is_available()
bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.bfloat16 if gpu else torch.float32)
model = AutoModelForCausalLM.from_pretrained(model_name, quantization_config=bnb, device_map={"": 0 if gpu else "cpu"})
tokenizer = AutoTokenizer.from_pretrained(model_name)
trainer = SFTTrainer(model=model, processing_class=tokenizer,
                     train_dataset=load_dataset("json", data_files=data_file, split="train"),
                     peft_config=LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
                     args=SFTConfig(output_dir="outputs/example", max_steps=max_steps, per_device_train_batch_size=4,
                                    bf16=gpu, gradient_checkpointing=True, report_to="none", use_cpu=not gpu))
print(qlora_fast.patch_model(trainer.model).summary())  # <- added: LoRA layers now run on fused kernels
trainer.train()
trainer.save_model("outputs/example")  # a plain peft adapter
