//! Chat and completions requests, read field by field and checked before anything is
//! queued. Fields that would change the answer's meaning and are not supported (tools, a
//! JSON response format, log probabilities, penalties, `n` other than 1, ...) are refused
//! with a 400 naming the field; the same fields at their neutral value are accepted, and
//! so are the informational ones (`user`, `metadata`, `store`, ...). Any other field is
//! refused by name, as OpenAI itself does, rather than silently ignored.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ApiError;
use crate::frontend::http::{Fields, Strings, field, required};
use crate::inference::generate::{GenerateCall, Prompt};
use crate::request_id::RequestId;

/// Which of the two OpenAI generation endpoints a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Chat,
    Completions,
}

/// OpenAI's default sampling temperature.
const OPENAI_TEMPERATURE: f32 = 1.0;

/// A message's content: a string, or a list of parts of which only text parts are
/// taken. Read as it streams by (an untagged enum would first hold it all as a tree).
#[derive(Debug)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One part of a message's content; its other fields are skipped unread.
#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: Option<String>,
    text: Option<String>,
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Content;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of content parts")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Content, E> {
                Ok(Content::Text(s.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                let mut parts = Vec::new();
                while let Some(p) = seq.next_element::<Part>()? {
                    parts.push(p);
                }
                Ok(Content::Parts(parts))
            }
        }
        d.deserialize_any(V)
    }
}

/// One chat message; a field other than these is refused by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InMessage {
    role: String,
    content: Option<Content>,
    /// A participant's name: accepted, not used.
    #[allow(dead_code)]
    name: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What chat and completions requests share.
#[derive(Debug)]
struct GenerationFields {
    model: String,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Strings>,
    n: Option<u32>,
    stream: bool,
    stream_options: Option<StreamOptions>,
}

impl GenerationFields {
    /// The shared fields, taken out of `body` (what is left is checked by [`check_rest`]).
    fn take(body: &mut Body) -> Result<Self, ApiError> {
        Ok(Self {
            model: required(body, "model")?,
            max_tokens: field(body, "max_tokens")?,
            max_completion_tokens: field(body, "max_completion_tokens")?,
            temperature: field(body, "temperature")?,
            top_p: field(body, "top_p")?,
            seed: field(body, "seed")?,
            stop: field(body, "stop")?,
            n: field(body, "n")?,
            stream: field(body, "stream")?.unwrap_or(false),
            stream_options: field(body, "stream_options")?,
        })
    }
}

/// `response_format`'s type; its other fields are skipped unread.
#[derive(Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
}

/// Whether `raw`, the value of the unsupported field `name`, leaves the answer as it
/// would be without it; `None` for fields this gateway does not know. Each value is read
/// as the one type its neutral value has, so none is held in memory as a tree.
fn neutral(name: &str, raw: &RawValue) -> Option<bool> {
    let is = |want: &str| raw.get().split_whitespace().collect::<String>() == want;
    let typed = |check: fn(&str) -> bool| check(raw.get());
    Some(match name {
        // Informational: they never change the answer.
        "user" | "metadata" | "store" | "service_tier" | "parallel_tool_calls" => true,
        "frequency_penalty" | "presence_penalty" | "top_logprobs" => {
            typed(|r| serde_json::from_str::<Option<f64>>(r).is_ok_and(|v| v.is_none_or(|x| x == 0.0)))
        }
        "logprobs" | "echo" => is("null") || is("false") || is("0"),
        "tools" | "functions" | "logit_bias" => is("null") || is("[]") || is("{}"),
        "tool_choice" | "function_call" => {
            typed(|r| serde_json::from_str::<Option<String>>(r).is_ok_and(|v| v.is_none_or(|s| s == "none")))
        }
        "response_format" => typed(|r| {
            serde_json::from_str::<Option<ResponseFormat>>(r)
                .is_ok_and(|v| v.is_none_or(|f| f.kind == "text"))
        }),
        "best_of" => {
            typed(|r| serde_json::from_str::<Option<u64>>(r).is_ok_and(|v| v.is_none_or(|n| n == 1)))
        }
        "suffix" => {
            typed(|r| serde_json::from_str::<Option<String>>(r).is_ok_and(|v| v.is_none_or(|s| s.is_empty())))
        }
        _ => return None,
    })
}

fn check_rest(rest: &Body) -> Result<(), ApiError> {
    for (name, value) in rest {
        let shown: String = name.chars().take(64).collect();
        match neutral(name, value) {
            Some(true) => {}
            Some(false) => {
                return Err(ApiError::invalid(format!(
                    "'{shown}' is not supported (only its neutral value is)"
                )));
            }
            None => return Err(ApiError::invalid(format!("unrecognized field '{shown}'"))),
        }
    }
    Ok(())
}

impl GenerationFields {
    fn call(
        self,
        prompt: Prompt,
        timeout: Option<std::time::Duration>,
        request_id: RequestId,
    ) -> Result<GenerateCall, ApiError> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid(format!(
                "'n' {n} is not supported: only 1 answer per request"
            )));
        }
        if self.stream_options.is_some() && !self.stream {
            return Err(ApiError::invalid(
                "'stream_options' is only allowed with 'stream': true",
            ));
        }
        let stop = self.stop.map_or_else(Vec::new, |s| s.0);
        Ok(GenerateCall {
            model: self.model,
            prompt,
            // langchain-openai sends max_completion_tokens, older clients max_tokens.
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature.unwrap_or(OPENAI_TEMPERATURE),
            top_p: self.top_p,
            seed: self.seed,
            stop,
            timeout,
            request_id,
        })
    }
}

fn messages(input: Vec<InMessage>) -> Result<Prompt, ApiError> {
    if input.is_empty() {
        return Err(ApiError::invalid("'messages' must not be empty"));
    }
    let mut out = Vec::with_capacity(input.len());
    for (i, m) in input.into_iter().enumerate() {
        let content = match m.content {
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.kind.as_deref(), part.text.as_deref()) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(format!(
                                "messages[{i}].content[{j}] must be a text part ({{\"type\": \"text\", \"text\": ...}})"
                            )));
                        }
                    }
                }
                text
            }
            None => return Err(ApiError::invalid(format!("messages[{i}].content is missing"))),
        };
        // OpenAI's newer name for the system role.
        let role = if m.role == "developer" {
            "system".to_owned()
        } else {
            m.role
        };
        out.push((role, content));
    }
    Ok(Prompt::Chat(out))
}

/// The body of a generation request, its fields taken out one by one (see [`field`]).
pub(crate) type Body = Fields;

/// A chat or completions body, checked: the generation to run, and how to answer.
pub(crate) struct Parsed {
    pub call: GenerateCall,
    pub stream: bool,
    pub include_usage: bool,
}

/// Reads a chat (`messages`) or completions (`prompt`) body; every field is checked
/// before anything is queued.
pub(crate) fn parse(
    endpoint: Endpoint,
    mut body: Body,
    timeout: Option<std::time::Duration>,
    request_id: RequestId,
) -> Result<Parsed, ApiError> {
    let prompt = match endpoint {
        Endpoint::Chat => messages(required(&mut body, "messages")?)?,
        Endpoint::Completions => match required::<Strings>(&mut body, "prompt")?.0 {
            mut v if v.len() == 1 => Prompt::Text(v.remove(0)),
            v => {
                return Err(ApiError::invalid(format!(
                    "'prompt' must be one string, got a list of {}",
                    v.len()
                )));
            }
        },
    };
    let fields = GenerationFields::take(&mut body)?;
    check_rest(&body)?;
    let (stream, include_usage) = (
        fields.stream,
        fields.stream_options.as_ref().is_some_and(|o| o.include_usage),
    );
    Ok(Parsed {
        call: fields.call(prompt, timeout, request_id)?,
        stream,
        include_usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// `v`, an object, as a request body.
    fn body(v: Value) -> Body {
        serde_json::from_str(&v.to_string()).unwrap()
    }

    #[test]
    fn unsupported_fields_are_refused_by_name_and_neutral_ones_accepted() {
        let ok = json!({"user": "u", "tools": [], "logprobs": false, "frequency_penalty": 0,
                        "response_format": {"type": "text"}, "tool_choice": "none", "logit_bias": {},
                        "best_of": 1, "suffix": "", "presence_penalty": null, "metadata": [1, 2]});
        check_rest(&body(ok)).unwrap();
        for (field, value, want) in [
            ("tools", json!([{"type": "function"}]), "'tools' is not supported"),
            (
                "response_format",
                json!({"type": "json_object"}),
                "'response_format' is not supported",
            ),
            ("logprobs", json!(true), "'logprobs' is not supported"),
            (
                "presence_penalty",
                json!(0.5),
                "'presence_penalty' is not supported",
            ),
            (
                "frequency_penalty",
                json!(-1),
                "'frequency_penalty' is not supported",
            ),
            ("mystery", json!(1), "unrecognized field 'mystery'"),
        ] {
            let err = check_rest(&body(json!({ field: value })))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{field}: {err}");
        }
    }

    #[test]
    fn message_contents_are_text_or_text_parts() {
        let parse = |v: Value| messages(serde_json::from_value(v).unwrap());
        let mut fields = body(json!({"model": "m", "max_tokens": "many"}));
        let err = GenerationFields::take(&mut fields).unwrap_err().to_string();
        assert!(err.starts_with("'max_tokens': wrong type, expected u32"), "{err}");
        let Prompt::Chat(m) = parse(json!([
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]))
        .unwrap() else {
            panic!("a chat")
        };
        assert_eq!(
            m,
            vec![
                ("system".to_string(), "be brief".to_string()),
                ("user".into(), "ab".into())
            ]
        );
        let err = parse(json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("messages[0].content[0] must be a text part"),
            "{err}"
        );
        let mut fields =
            body(json!({"messages": [{"role": "assistant", "content": null, "tool_calls": []}]}));
        let err = required::<Vec<InMessage>>(&mut fields, "messages").unwrap_err();
        assert!(
            err.to_string()
                .contains(r#"'messages': unknown field "tool_calls""#),
            "{err}"
        );
    }
}
