//! The README's Burn snippets are copies of code that CI compiles: each block of its Burn
//! section must appear, line for line, in the crate's documentation example (a doctest)
//! or in one of the crate's examples.

/// The lines of `text` with leading whitespace and doc-comment markers taken off.
fn lines(text: &str) -> Vec<String> {
    (text.lines())
        .map(|l| {
            let l = l.trim_start();
            let l = (l.strip_prefix("//!"))
                .or_else(|| l.strip_prefix("///"))
                .unwrap_or(l);
            l.trim_start().to_string()
        })
        .collect()
}

fn contains(haystack: &[String], needle: &[String]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn every_burn_snippet_in_the_readme_is_compiled_code() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let section = readme
        .split("\n## Burn\n")
        .nth(1)
        .expect("a Burn section")
        .split("\n## ")
        .next()
        .unwrap();
    let blocks: Vec<Vec<String>> = section
        .split("```rust")
        .skip(1)
        .map(|b| lines(b.split_once('\n').unwrap().1.split("```").next().unwrap()))
        .map(|b| b.into_iter().filter(|l| !l.is_empty()).collect())
        .collect();
    assert!(blocks.len() >= 2, "the Burn section's code blocks");
    let sources: Vec<Vec<String>> = [
        "src/lib.rs",
        "examples/learner_regression.rs",
        "examples/burn_training.rs",
    ]
    .iter()
    .map(|f| {
        let text = std::fs::read_to_string(format!("{root}/gradclip-burn/{f}")).unwrap();
        lines(&text).into_iter().filter(|l| !l.is_empty()).collect()
    })
    .collect();
    for block in &blocks {
        assert!(
            sources.iter().any(|s| contains(s, block)),
            "a README Burn block is not in compiled code:\n{}",
            block.join("\n")
        );
    }
}
