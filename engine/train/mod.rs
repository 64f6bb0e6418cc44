//! Training: losses (SFT and the ILRec objective), LoRA, the CPU backward, the optimiser and
//! schedule, checkpoints.
pub mod backprop;
pub mod checkpoint;
pub mod lora;
pub mod loss;
pub mod optim;
pub mod trainer;
