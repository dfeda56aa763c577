"""Training code for the Slow-Fast video LLM, and what lives where.

* Entry point and loop: ``train`` -- ``python -m llava.train.train`` (stage 1 pretrain, stage 2 SFT);
  ``arguments`` -- its command line, with the reference's names; ``trainer`` -- :class:`SlowFastTrainer`
  (per-module learning rates, planned batches, checkpoints, stopping).
* Data: ``annotations`` -- the sample format, its validation and streaming readers; ``store`` -- the
  memory-mapped annotation store shared by every process; ``mixture`` -- several annotation files drawn into one
  set; ``samples`` -- the set over stores, one sample materialised at a time; ``data`` -- the training set
  (decoding, tokenising); ``template`` -- the chat template, labels and truncation; ``lengths`` -- every sample's
  length without decoding; ``sampling`` -- orders and batches planned from the lengths (length grouping, packing,
  token budgets); ``collators`` -- padded or packed batches; ``loader`` -- the DataLoader of planned batches.
* Long runs: ``stopping`` -- stop with a checkpoint on a signal or a time budget; ``worker_signals`` -- DataLoader
  workers that leave stop signals to the trainer; ``checkpoints`` -- checkpoints a resumed run can trust;
  ``run_record`` -- what a checkpoint records about its run; ``resume`` -- where a run resumes, decided once.
"""
