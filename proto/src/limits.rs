//! The rules of a request that both the gateway and rank 0 enforce: the gateway before
//! the request costs a group anything, rank 0 again because it can be called directly.
//! Each rule is written here once, with its message, and both sides call it.

use crate::worker::GenerateRequest;

/// Limits of a `GenerateRequest`: the prompt's bytes (all message contents, or the raw
/// prompt), the chat messages, the stop strings and each stop string's bytes.
pub const MAX_PROMPT_BYTES: usize = 256 << 10;
pub const MAX_MESSAGES: usize = 256;
pub const MAX_STOPS: usize = 4;
pub const MAX_STOP_BYTES: usize = 64;

/// Default of the gateway's and the worker's `--max-text-bytes`: the longest text an
/// embedding request may carry, checked before anything tokenizes it.
pub const DEFAULT_MAX_TEXT_BYTES: usize = 16 * 1024;

/// The chat roles a generative model's template renders.
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Longest piece of a client's role that a message quotes.
const SHOWN_ROLE_CHARS: usize = 32;

/// A broken rule, worded for the caller who broke it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Invalid {
    #[error("{0} messages: at most {MAX_MESSAGES}")]
    TooManyMessages(usize),
    #[error("messages[{index}].role {role:?} is not one of system, user, assistant")]
    UnknownRole { index: usize, role: String },
    #[error("the prompt is {0} bytes: at most {MAX_PROMPT_BYTES}")]
    PromptTooLong(usize),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("give messages or prompt, not both")]
    MessagesAndPrompt,
    #[error("max_tokens {max_tokens} must be between 1 and the context length {context}")]
    MaxTokens { max_tokens: u32, context: u32 },
    #[error("temperature {0} must be 0 (greedy) or positive")]
    Temperature(f32),
    #[error("top_p {0} must be in (0, 1]")]
    TopP(f32),
    #[error("{0} stop strings: at most {MAX_STOPS}")]
    TooManyStops(usize),
    #[error("a stop string must be 1 to {MAX_STOP_BYTES} bytes, got {0} bytes")]
    StopBytes(usize),
    #[error("text {index} is {bytes} bytes; texts of at most {max} bytes are accepted (--max-text-bytes)")]
    TextTooLong { index: usize, bytes: usize, max: usize },
}

/// Checks a generation as it goes to (or arrives at) rank 0, for a model whose context
/// holds `context` tokens: every rule above but the tokenizer's own.
pub fn check_generate(req: &GenerateRequest, context: u32) -> Result<(), Invalid> {
    if req.messages.len() > MAX_MESSAGES {
        return Err(Invalid::TooManyMessages(req.messages.len()));
    }
    for (index, m) in req.messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            let role = m.role.chars().take(SHOWN_ROLE_CHARS).collect();
            return Err(Invalid::UnknownRole { index, role });
        }
    }
    let bytes = req.prompt.len() + req.messages.iter().map(|m| m.content.len()).sum::<usize>();
    if bytes > MAX_PROMPT_BYTES {
        return Err(Invalid::PromptTooLong(bytes));
    }
    match (req.messages.is_empty(), req.prompt.is_empty()) {
        (false, false) => return Err(Invalid::MessagesAndPrompt),
        (true, true) => return Err(Invalid::EmptyPrompt),
        // Content that is not UTF-8 is not blank; rank 0 refuses it by name when it decodes it.
        (false, true) if req.messages.iter().all(|m| is_blank(&m.content)) => {
            return Err(Invalid::EmptyPrompt);
        }
        _ => {}
    }
    check_sampling(req.max_tokens, req.temperature, req.top_p, context)?;
    check_stops(&req.stop)
}

fn is_blank(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(|s| s.trim().is_empty())
}

/// `max_tokens` within the context, a finite temperature of at least 0, `top_p` in (0, 1].
pub fn check_sampling(
    max_tokens: u32,
    temperature: f32,
    top_p: Option<f32>,
    context: u32,
) -> Result<(), Invalid> {
    if max_tokens == 0 || max_tokens > context {
        return Err(Invalid::MaxTokens { max_tokens, context });
    }
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(Invalid::Temperature(temperature));
    }
    if let Some(p) = top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(Invalid::TopP(p));
    }
    Ok(())
}

/// At most [`MAX_STOPS`] stop strings of 1 to [`MAX_STOP_BYTES`] bytes each.
pub fn check_stops<S: AsRef<[u8]>>(stops: &[S]) -> Result<(), Invalid> {
    if stops.len() > MAX_STOPS {
        return Err(Invalid::TooManyStops(stops.len()));
    }
    match stops
        .iter()
        .map(|s| s.as_ref().len())
        .find(|&n| n == 0 || n > MAX_STOP_BYTES)
    {
        Some(n) => Err(Invalid::StopBytes(n)),
        None => Ok(()),
    }
}

/// The first of `texts` longer than `max` bytes, if any.
pub fn check_text_bytes<S: AsRef<[u8]>>(texts: &[S], max: usize) -> Result<(), Invalid> {
    match texts.iter().enumerate().find(|(_, t)| t.as_ref().len() > max) {
        Some((index, t)) => Err(Invalid::TextTooLong {
            index,
            bytes: t.as_ref().len(),
            max,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::ChatMessage;

    fn chat(messages: &[(&str, &str)]) -> GenerateRequest {
        GenerateRequest {
            messages: messages
                .iter()
                .map(|(role, content)| ChatMessage {
                    role: (*role).into(),
                    content: content.as_bytes().to_vec().into(),
                })
                .collect(),
            max_tokens: 16,
            temperature: 0.0,
            ..Default::default()
        }
    }

    #[test]
    fn each_broken_rule_is_named() {
        let ok = chat(&[("system", "be brief"), ("user", "hi")]);
        assert_eq!(check_generate(&ok, 8192), Ok(()));
        let with = |f: &dyn Fn(&mut GenerateRequest)| {
            let mut r = ok.clone();
            f(&mut r);
            r
        };
        let cases: Vec<(&str, GenerateRequest, Invalid)> = vec![
            ("no prompt", GenerateRequest::default(), Invalid::EmptyPrompt),
            ("blank chat", chat(&[("user", " \n")]), Invalid::EmptyPrompt),
            (
                "both",
                with(&|r| r.prompt = b"x".to_vec().into()),
                Invalid::MessagesAndPrompt,
            ),
            (
                "role",
                chat(&[("user", "a"), ("wizard", "b")]),
                Invalid::UnknownRole {
                    index: 1,
                    role: "wizard".into(),
                },
            ),
            (
                "messages",
                chat(&vec![("user", "a"); MAX_MESSAGES + 1]),
                Invalid::TooManyMessages(MAX_MESSAGES + 1),
            ),
            (
                "prompt bytes",
                with(&|r| r.messages[1].content = vec![b'a'; MAX_PROMPT_BYTES].into()),
                Invalid::PromptTooLong(MAX_PROMPT_BYTES + 8),
            ),
            (
                "max_tokens 0",
                with(&|r| r.max_tokens = 0),
                Invalid::MaxTokens {
                    max_tokens: 0,
                    context: 8192,
                },
            ),
            (
                "max_tokens over the context",
                with(&|r| r.max_tokens = 8193),
                Invalid::MaxTokens {
                    max_tokens: 8193,
                    context: 8192,
                },
            ),
            (
                "temperature",
                with(&|r| r.temperature = -1.0),
                Invalid::Temperature(-1.0),
            ),
            ("top_p", with(&|r| r.top_p = Some(1.5)), Invalid::TopP(1.5)),
            (
                "stops",
                with(&|r| r.stop = vec![b"a".to_vec().into(); MAX_STOPS + 1]),
                Invalid::TooManyStops(MAX_STOPS + 1),
            ),
            (
                "empty stop",
                with(&|r| r.stop = vec![Vec::new().into()]),
                Invalid::StopBytes(0),
            ),
        ];
        for (name, req, want) in cases {
            assert_eq!(check_generate(&req, 8192), Err(want), "case {name:?}");
        }
    }

    #[test]
    fn a_long_role_is_cut_in_the_message() {
        let err = check_generate(&chat(&[(&"r".repeat(1000), "hi")]), 8192).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!(".role \"{}\" is not", "r".repeat(32))),
            "{err}"
        );
        assert!(err.to_string().len() < 128, "{err}");
    }

    #[test]
    fn a_temperature_that_is_not_a_number_is_refused() {
        assert_eq!(
            check_sampling(1, f32::NAN, None, 1).map_err(|e| e.to_string()),
            Err("temperature NaN must be 0 (greedy) or positive".into())
        );
        assert!(check_sampling(1, f32::INFINITY, None, 1).is_err());
        assert_eq!(check_sampling(1, 0.7, Some(1.0), 1), Ok(()));
    }

    #[test]
    fn the_first_long_text_is_named() {
        assert_eq!(
            check_text_bytes(&["ab", "abcd", "abcdef"], 3),
            Err(Invalid::TextTooLong {
                index: 1,
                bytes: 4,
                max: 3
            })
        );
        assert_eq!(check_text_bytes(&["ab"], 2), Ok(()));
    }
}
