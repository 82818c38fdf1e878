//! `--response-format`: the structured-output format a benchmark's requests ask for, read
//! from a short command-line form into the OpenAI/Fireworks `response_format` object, so
//! `ember bench serve` sends it and `ember bench throughput` compiles it as the server would.

use std::path::Path;

use serde_json::{json, Value};

/// How the flag is written, for its help and its errors.
pub const FORMS: &str = "json_object, json_schema:<file or inline JSON>, grammar:<GBNF file or \
                         inline GBNF>, or a whole response_format object {\"type\": ...}";

/// Reads `--response-format`: `json_object`; `json_schema:` and a schema file or inline JSON
/// schema; `grammar:` and a GBNF file or inline GBNF (text with `::=`); or a whole
/// `response_format` JSON object, taken as it is.
pub fn parse_response_format(text: &str) -> Result<Value, String> {
    let text = text.trim();
    if text.starts_with('{') {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| format!("--response-format {text:?} is not JSON: {e}"))?;
        if value.get("type").and_then(Value::as_str).is_none() {
            return Err(format!(
                "--response-format {text}: a response_format object needs a \"type\""
            ));
        }
        return Ok(value);
    }
    let (kind, rest) = text.split_once(':').unwrap_or((text, ""));
    match (kind, rest) {
        ("json_object", "") => Ok(json!({"type": "json_object"})),
        ("json_schema", source) if !source.is_empty() => {
            let schema_text = if source.trim_start().starts_with('{') {
                source.to_string()
            } else {
                read(source, "json_schema")?
            };
            let schema: Value = serde_json::from_str(&schema_text)
                .map_err(|e| format!("--response-format json_schema:{source}: not JSON: {e}"))?;
            if !schema.is_object() {
                return Err(format!(
                    "--response-format json_schema:{source}: a JSON schema is an object {{...}}"
                ));
            }
            Ok(json!({"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}))
        }
        ("grammar", source) if !source.is_empty() => {
            let grammar = if Path::new(source).is_file() || !source.contains("::=") {
                read(source, "grammar")?
            } else {
                source.to_string()
            };
            Ok(json!({"type": "grammar", "grammar": grammar}))
        }
        _ => Err(format!("--response-format {text:?}: expected {FORMS}")),
    }
}

/// The file a `kind:` form names.
fn read(path: &str, kind: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| {
        format!("--response-format {kind}:{path}: cannot read {path} ({e}); give a file or the {kind} inline")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_form_becomes_a_response_format_object() {
        assert_eq!(
            parse_response_format("json_object"),
            Ok(json!({"type": "json_object"}))
        );
        let schema = json!({"type": "array", "items": {"type": "string"}});
        let want =
            json!({"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}});
        assert_eq!(
            parse_response_format(&format!("json_schema:{schema}")),
            Ok(want.clone())
        );
        let dir = std::env::temp_dir().join(format!("ember-rf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let schema_file = dir.join("schema.json");
        std::fs::write(&schema_file, schema.to_string()).unwrap();
        assert_eq!(
            parse_response_format(&format!("json_schema:{}", schema_file.display())),
            Ok(want)
        );
        let gbnf = "root ::= [a-z ]*";
        let grammar_file = dir.join("words.gbnf");
        std::fs::write(&grammar_file, gbnf).unwrap();
        let want = json!({"type": "grammar", "grammar": gbnf});
        assert_eq!(
            parse_response_format(&format!("grammar:{}", grammar_file.display())),
            Ok(want.clone())
        );
        assert_eq!(parse_response_format(&format!("grammar:{gbnf}")), Ok(want));
        let whole = json!({"type": "json_schema", "schema": {"type": "object"}});
        assert_eq!(parse_response_format(&whole.to_string()), Ok(whole));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_bad_form_says_what_is_expected() {
        let err = |text: &str| parse_response_format(text).unwrap_err();
        assert!(err("xml").contains("expected json_object, json_schema:"));
        assert!(err("json_object:x").contains("expected json_object"));
        assert!(err("json_schema:").contains("expected json_object"));
        assert!(err("json_schema:{nope").contains("not JSON"));
        assert!(err("json_schema:[1]").contains("cannot read"));
        assert!(
            err("json_schema:/no/such/schema.json").contains("cannot read /no/such/schema.json")
        );
        assert!(err("grammar:/no/such.gbnf").contains("give a file or the grammar inline"));
        assert!(err("{\"schema\": {}}").contains("needs a \"type\""));
    }
}
