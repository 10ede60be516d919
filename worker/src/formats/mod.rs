//! The weight files models load from, read and bounded before anything is allocated:
//! [`gguf`] (llama.cpp's container, its metadata and tokenizer, and the dequantization of
//! its tensors to f32) and [`safetensors`] (Hugging Face's, read shard by shard).

pub mod gguf;
pub mod safetensors;
