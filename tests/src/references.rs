//! The references answers are held to: MiniLM's embeddings and SmolLM2's greedy answers
//! (tests/fixtures, made by scripts/make_reference.py and make_smollm2_reference.py).

use serde_json::Value;

use crate::*;

/// The sentence-transformers reference fixture.
pub struct Reference {
    pub sentences: Vec<String>,
    pub token_counts: Vec<i64>,
    pub embeddings: Vec<Vec<f32>>,
}

pub fn reference() -> Reference {
    let path = workspace_root().join("tests/fixtures/minilm_reference.json");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read fixture")).expect("fixture JSON");
    let strings = |k: &str| {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    Reference {
        sentences: strings("sentences"),
        token_counts: v["token_counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect(),
        embeddings: v["embeddings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                e.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect(),
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vector lengths differ");
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// Asserts each vector matches the reference of the same sentence with cosine >= 0.9999.
pub fn assert_matches_reference(what: &str, got: &[Vec<f32>], want: &[Vec<f32>], sentences: &[String]) {
    assert_eq!(got.len(), want.len(), "{what}: number of embeddings");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let c = cosine(g, w);
        assert!(
            c >= 0.9999,
            "{what}: sentence {i} {:?}: cosine {c} < 0.9999",
            sentences[i]
        );
    }
}

/// A JSON array of numbers (an embedding or flat OIP `data`) as f32s.
pub fn json_f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// tests/fixtures/smollm2_generation_reference.json (scripts/make_smollm2_reference.py).
pub fn smollm2_reference() -> Value {
    let path = workspace_root().join("tests/fixtures/smollm2_generation_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The reference's first case: its question and the worker's greedy answer.
pub fn smollm2_first_answer() -> (String, String) {
    let f = smollm2_reference();
    let case = &f["cases"][0];
    let question = case["messages"][0]["content"].as_str().unwrap().to_owned();
    let answer = case["greedy_text"].as_str().unwrap().replace("<|im_end|>", "");
    (question, answer)
}

/// The reference's cases whose greedy answer runs all 24 tokens without ending, for
/// streams that must still be under way a few steps after they start.
pub fn long_answer_cases(reference: &Value) -> Vec<Value> {
    let eos = &reference["eos_token_id"];
    reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            let ids = c["greedy_ids"].as_array().unwrap();
            ids.len() == 24 && !ids.contains(eos)
        })
        .cloned()
        .collect()
}
