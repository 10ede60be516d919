//! The tokenizer and chat template of a GGUF LLaMA-family model, built from the file's
//! own `tokenizer.ggml.*` metadata and `tokenizer.chat_template`.
//!
//! The vocabulary is GPT-2 style byte-level BPE (`tokenizer.ggml.model = "gpt2"`), built
//! with the `tokenizers` crate. The pre-tokenizer follows `tokenizer.ggml.pre`: only the
//! variants whose rules are known here are accepted (a wrong split would silently give
//! other token ids). Control tokens (`<|im_start|>`, `<|im_end|>`, ...) are special
//! tokens. The chat template is rendered by minijinja with the settings transformers uses
//! (`trim_blocks`, `lstrip_blocks`).
//!
//! A chat message's content is text, never control tokens: [`ChatTokenizer::encode_chat`]
//! encodes what the template writes with its control tokens, and each message's content
//! with them as plain text. Rendering the chat and tokenizing the result whole (what
//! transformers' `apply_chat_template(tokenize=True)` does) would let a user write
//! `<|im_end|><|im_start|>system` into a message and open a turn of another role.

use minijinja::Environment;
use serde::Serialize;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::formats::gguf::Gguf;
use crate::models::ModelError;

/// GGUF token type of control tokens.
const TOKEN_TYPE_CONTROL: u64 = 3;

/// Who said a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        match s {
            "system" => Ok(Role::System),
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            _ => Err(ModelError::InvalidInput(format!(
                "unknown role {:?}: expected system, user or assistant",
                s.chars().take(32).collect::<String>()
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// Wrap each message's content while the template renders, so [`ChatTokenizer::encode_chat`]
/// finds it in the rendered text: Unicode noncharacters, reserved for a program's internal
/// use, and refused in a message.
const CONTENT_START: char = '\u{FDD0}';
const CONTENT_END: char = '\u{FDD1}';

pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    /// The same vocabulary with control tokens' text encoded as text.
    plain: Tokenizer,
    template: String,
    bos: String,
    eos: String,
    pub eos_id: u32,
    vocab_size: usize,
}

fn load_error(m: impl std::fmt::Display) -> ModelError {
    ModelError::Load(format!("tokenizer: {m}"))
}

fn strings<'a>(gguf: &'a Gguf, key: &str) -> Result<Vec<&'a str>, ModelError> {
    gguf.metadata(key)
        .and_then(|v| v.as_array())
        .ok_or_else(|| load_error(format!("{key} missing or not an array")))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| load_error(format!("{key} holds a non-string")))
        })
        .collect()
}

impl ChatTokenizer {
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, ModelError> {
        let kind = gguf.metadata("tokenizer.ggml.model").and_then(|v| v.as_str());
        if kind != Some("gpt2") {
            return Err(load_error(format!(
                "tokenizer.ggml.model {kind:?}: only byte-level BPE (gpt2) is supported"
            )));
        }
        let tokens = strings(gguf, "tokenizer.ggml.tokens")?;
        let merges = strings(gguf, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| load_error(format!("merge {m:?} is not two tokens")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let types = gguf
            .metadata("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
            .ok_or_else(|| load_error("tokenizer.ggml.token_type missing"))?;
        if types.len() != tokens.len() {
            return Err(load_error("token_type and tokens differ in length"));
        }
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(load_error)?;
        let pre = gguf
            .metadata("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            // llama.cpp's "smollm": every digit alone, then GPT-2's split.
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            "gpt2" | "default" => byte_level.into(),
            other => {
                return Err(load_error(format!(
                    "tokenizer.ggml.pre {other:?} is not supported"
                )));
            }
        };
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter(|(_, ty)| ty.as_u64() == Some(TOKEN_TYPE_CONTROL))
            .map(|(t, _)| AddedToken::from(t.to_string(), true))
            .collect();
        tokenizer.add_special_tokens(&special);
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        let token = |key: &str| -> Result<(u32, String), ModelError> {
            let id = gguf.require_u64(key)? as usize;
            let text = tokens
                .get(id)
                .ok_or_else(|| load_error(format!("{key} {id} is outside the vocabulary")))?;
            Ok((id as u32, text.to_string()))
        };
        let (_, bos) = token("tokenizer.ggml.bos_token_id")?;
        let (eos_id, eos) = token("tokenizer.ggml.eos_token_id")?;
        let template = gguf
            .metadata("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .ok_or_else(|| load_error("tokenizer.chat_template missing: the model has no chat format"))?
            .to_string();
        let this = Self {
            tokenizer,
            plain,
            template,
            bos,
            eos,
            eos_id,
            vocab_size: tokens.len(),
        };
        // A template that does not compile, or splits a message, fails the load, not the
        // first request.
        this.encode_chat(&[Message {
            role: Role::User,
            content: "hello".into(),
        }])?;
        Ok(this)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The prompt text for `messages` (bounded by the caller), ending where the
    /// assistant's answer begins.
    pub fn render(&self, messages: &[Message]) -> Result<String, ModelError> {
        if messages.is_empty() {
            return Err(ModelError::InvalidInput(
                "a chat needs at least one message".into(),
            ));
        }
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |m: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, m))
            },
        );
        let template = env
            .template_from_str(&self.template)
            .map_err(|e| load_error(format!("chat template: {e}")))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos,
                eos_token => &self.eos,
            })
            .map_err(|e| ModelError::InvalidInput(format!("chat template refused the messages: {e}")))
    }

    /// Token ids of `text`; control tokens written in it are those tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        encode(&self.tokenizer, text)
    }

    /// Token ids of the prompt for `messages`: the template's own text with its control
    /// tokens, each message's content as plain text (see the module's doc). The template
    /// sees each content between the two markers, so one that trims content or tests it
    /// for emptiness sees it unchanged and never empty (SmolLM2's does neither; the
    /// reference prompts' ids are the same either way).
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, ModelError> {
        for (i, m) in messages.iter().enumerate() {
            if m.content.contains([CONTENT_START, CONTENT_END]) {
                return Err(ModelError::InvalidInput(format!(
                    "messages[{i}].content holds U+FDD0 or U+FDD1, noncharacters a message may not contain"
                )));
            }
        }
        let wrapped: Vec<Message> = messages
            .iter()
            .map(|m| Message {
                role: m.role,
                content: format!("{CONTENT_START}{}{CONTENT_END}", m.content),
            })
            .collect();
        let rendered = self.render(&wrapped)?;
        let unwrapped = || load_error("the chat template split a message's content");
        let mut ids = Vec::new();
        let mut rest = rendered.as_str();
        while let Some((template, after)) = rest.split_once(CONTENT_START) {
            let (content, tail) = after.split_once(CONTENT_END).ok_or_else(unwrapped)?;
            if content.contains(CONTENT_START) {
                return Err(unwrapped());
            }
            ids.extend(encode(&self.tokenizer, template)?);
            ids.extend(encode(&self.plain, content)?);
            rest = tail;
        }
        if rest.contains(CONTENT_END) {
            return Err(unwrapped());
        }
        ids.extend(encode(&self.tokenizer, rest)?);
        Ok(ids)
    }

    /// Text of `ids`, control tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ModelError::InvalidInput(format!("cannot decode: {e}")))
    }
}

fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, ModelError> {
    let encoding = tokenizer
        .encode(text, false)
        .map_err(|e| ModelError::InvalidInput(format!("cannot tokenize: {e}")))?;
    Ok(encoding.get_ids().to_vec())
}
