//! Tokens to streamed text: incremental detokenization and stop strings.
//!
//! Byte-level BPE can split one character over several tokens, so text is released only
//! when the newest tokens decode to whole characters (the offsets method TGI uses: decode
//! a short window before and after the new token and send the difference). Text that
//! could be the start of a stop string is held back until it is known not to be; when a
//! stop string appears, the text ends just before it.

use crate::models::ModelError;
use crate::models::llama::tokenizer::ChatTokenizer;

pub struct TextStream<'t> {
    tokenizer: &'t ChatTokenizer,
    stops: Vec<String>,
    ids: Vec<u32>,
    /// Tokens before `prefix` are settled; `prefix..read` were decoded last time.
    prefix: usize,
    read: usize,
    text: String,
    /// Bytes of `text` already released.
    sent: usize,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t ChatTokenizer, stops: Vec<String>) -> Self {
        Self {
            tokenizer,
            stops,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            text: String::new(),
            sent: 0,
        }
    }

    /// Adds a token; returns the text to send now and whether a stop string ended it.
    pub fn push(&mut self, token: u32) -> Result<(String, bool), ModelError> {
        self.ids.push(token);
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = self.tokenizer.decode(&self.ids[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.starts_with(&before) {
            self.text.push_str(&after[before.len()..]);
            self.prefix = self.read;
            self.read = self.ids.len();
        }
        Ok(self.release())
    }

    /// The rest of the text once the sequence ended without a stop string.
    pub fn finish(&mut self) -> Result<String, ModelError> {
        let tail = self.tokenizer.decode(&self.ids[self.prefix..])?;
        let settled = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        if let Some(rest) = tail.strip_prefix(settled.as_str()) {
            self.text.push_str(rest);
        }
        let (out, stopped) = self.release();
        if stopped {
            return Ok(out);
        }
        let rest = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        Ok(out + &rest)
    }

    fn release(&mut self) -> (String, bool) {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        // A stop string may straddle what was sent and what is new.
        let mut from = self.sent.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(at) = hit {
            let out = self.text[self.sent.min(at)..at].to_string();
            self.sent = self.text.len();
            self.text.truncate(at);
            return (out, true);
        }
        // Hold back the longest tail that could begin a stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|p| self.text[self.sent..].ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let until = self.text.len() - hold;
        let out = self.text[self.sent..until].to_string();
        self.sent = until;
        (out, false)
    }
}
