//! The documentation holds together: every relative link in README.md, CHANGELOG.md and
//! docs/*.md names a file of the repository, every `#anchor` into a Markdown file names one of its
//! headings (by GitHub's slug), every page of docs/ is in the index, every page with Rust examples
//! is compiled as doctests, and the front page stays short. Reads files only; needs no feature.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The front page is a front page: what it is, install, first commands, links.
const FRONT_PAGE_MAX_LINES: usize = 300;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The pages whose links are checked: README.md, CHANGELOG.md and every docs/*.md.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md"), root().join("CHANGELOG.md")];
    pages.extend(docs_pages());
    pages
}

/// docs/*.md, sorted.
fn docs_pages() -> Vec<PathBuf> {
    let dir = root().join("docs");
    let mut found: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    found.sort();
    found
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root()).unwrap_or(path).display().to_string()
}

/// A fence line opens or closes a code block: three or more backticks or tildes, indented by at
/// most three spaces. Returns the fence's character and length.
fn fence(line: &str) -> Option<(char, usize)> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    let rest = &line[indent..];
    let c = rest.chars().next()?;
    if indent > 3 || (c != '`' && c != '~') {
        return None;
    }
    let n = rest.chars().take_while(|&x| x == c).count();
    (n >= 3).then_some((c, n))
}

/// The page's lines outside fenced code blocks, numbered from 1, with inline code spans removed:
/// a link or a heading inside code is not one.
fn prose_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut open: Option<(char, usize)> = None;
    for (i, line) in text.lines().enumerate() {
        match (open, fence(line)) {
            (None, Some(f)) => open = Some(f),
            (Some((c, n)), Some((c2, n2))) if c == c2 && n2 >= n && line.trim().chars().all(|x| x == c) => open = None,
            (Some(_), _) => {}
            (None, None) => out.push((i + 1, strip_code_spans(line))),
        }
    }
    out
}

/// Removes inline code spans (a run of N backticks up to the next run of exactly N) and keeps
/// an unmatched run as text, as CommonMark does within one line.
fn strip_code_spans(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|&&c| c == '`').count();
        let mut j = i + run;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let r = chars[j..].iter().take_while(|&&c| c == '`').count();
                if r == run {
                    close = Some(j + r);
                    break;
                }
                j += r;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => {
                out.push(' ');
                i = end;
            }
            None => {
                out.extend(&chars[i..i + run]);
                i += run;
            }
        }
    }
    out
}

/// The destinations of the inline links and images (`[text](dest "title")`) and link reference
/// definitions (`[label]: dest`) on one line of prose.
fn link_destinations(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let trimmed = line.trim_start();
    if trimmed.starts_with('[') {
        if let Some(end) = trimmed.find("]:") {
            if !trimmed[1..end].contains(']') {
                if let Some(dest) = trimmed[end + 2..].split_whitespace().next() {
                    found.push(dest.trim_start_matches('<').trim_end_matches('>').to_string());
                }
            }
        }
    }
    let mut rest = line;
    while let Some(at) = rest.find("](") {
        let after = rest[at + 2..].trim_start();
        let dest = if let Some(inner) = after.strip_prefix('<') {
            inner.split('>').next().unwrap_or("").to_string()
        } else {
            // Up to whitespace or the parenthesis that closes the link (balanced ones belong to it).
            let mut depth = 0usize;
            let mut end = after.len();
            for (k, c) in after.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' if depth == 0 => {
                        end = k;
                        break;
                    }
                    ')' => depth -= 1,
                    c if c.is_whitespace() => {
                        end = k;
                        break;
                    }
                    _ => {}
                }
            }
            after[..end].to_string()
        };
        found.push(dest);
        rest = &rest[at + 2..];
    }
    found
}

/// A destination another site or program handles (a URL with a scheme, `mailto:`).
fn is_external(dest: &str) -> bool {
    let scheme_end = dest.find(':');
    let first_slash = dest.find('/').unwrap_or(dest.len());
    matches!(scheme_end, Some(c) if c < first_slash && c > 0)
        && dest[..scheme_end.unwrap_or(0)]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}

/// GitHub's anchor for a heading: the text as rendered (code marks, emphasis marks and link
/// targets gone), lower-cased, every character that is not a letter, digit, space, `-` or `_`
/// dropped, spaces turned into `-`.
fn slug(heading: &str) -> String {
    let mut text = String::new();
    let mut rest = heading;
    // `[text](url)` renders as `text`.
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|c| open + c) else {
            break;
        };
        let Some(end) = rest[close..].find(')').map(|e| close + e) else {
            break;
        };
        text.push_str(&rest[..open]);
        text.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    text.push_str(rest);
    let mut slug = String::new();
    for c in text.trim().chars() {
        if c == '*' || c == '`' {
            continue;
        }
        if c.is_alphanumeric() || c == '-' || c == '_' {
            slug.extend(c.to_lowercase());
        } else if c == ' ' {
            slug.push('-');
        }
    }
    slug
}

/// The anchors a page's ATX headings (`#` to `######`) get on GitHub, repeats numbered `-1`, `-2`...
fn anchors(text: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut open: Option<(char, usize)> = None;
    for line in text.lines() {
        match (open, fence(line)) {
            (None, Some(f)) => {
                open = Some(f);
                continue;
            }
            (Some((c, n)), Some((c2, n2))) if c == c2 && n2 >= n && line.trim().chars().all(|x| x == c) => {
                open = None;
                continue;
            }
            (Some(_), _) => continue,
            (None, None) => {}
        }
        let trimmed = line.trim_start_matches(' ');
        if line.len() - trimmed.len() > 3 {
            continue;
        }
        let level = trimmed.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&level) {
            continue;
        }
        let rest = &trimmed[level..];
        if !(rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\t')) {
            continue;
        }
        // A closing sequence of `#`s is not part of the heading.
        let rest = rest.trim();
        let rest = match rest.trim_end_matches('#') {
            t if t.len() < rest.len() && (t.is_empty() || t.ends_with(' ')) => t.trim_end(),
            _ => rest,
        };
        let base = slug(rest);
        let mut candidate = base.clone();
        let mut n = 0;
        while seen.contains(&candidate) {
            n += 1;
            candidate = format!("{base}-{n}");
        }
        seen.insert(candidate);
    }
    seen
}

/// Every broken relative link of one page, as `page:line: what`.
fn check_page(page: &Path, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let dir = page.parent().expect("a page lives in a directory");
    let repo = root().canonicalize().expect("the repository root");
    for (line_no, line) in prose_lines(text) {
        for dest in link_destinations(&line) {
            if dest.is_empty() || is_external(&dest) {
                continue;
            }
            let where_ = format!("{}:{line_no}: link `{dest}`", relative(page));
            let (path_part, fragment) = match dest.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (dest.as_str(), None),
            };
            let target = if path_part.is_empty() {
                page.to_path_buf()
            } else if path_part.starts_with('/') {
                problems.push(format!("{where_}: an absolute path; write it relative to the page"));
                continue;
            } else {
                dir.join(path_part)
            };
            let Ok(resolved) = target.canonicalize() else {
                problems.push(format!("{where_}: {} does not exist", relative(&target)));
                continue;
            };
            if !resolved.starts_with(&repo) {
                problems.push(format!("{where_}: leaves the repository"));
                continue;
            }
            let Some(fragment) = fragment else { continue };
            if resolved.extension().is_none_or(|e| e != "md") {
                continue; // a line anchor into source or the like: the host's business
            }
            let target_text = if resolved == page.canonicalize().expect("the page") {
                text.to_string()
            } else {
                read(&resolved)
            };
            if !anchors(&target_text).contains(fragment) {
                problems.push(format!(
                    "{where_}: {} has no heading with the anchor #{fragment}",
                    relative(&resolved)
                ));
            }
        }
    }
    problems
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let pages = pages();
    assert!(
        pages.len() > 3,
        "README.md, CHANGELOG.md and the docs/ pages: found {pages:?}"
    );
    let mut links = 0;
    let mut problems = Vec::new();
    for page in &pages {
        let text = read(page);
        links += prose_lines(&text)
            .iter()
            .map(|(_, l)| link_destinations(l).len())
            .sum::<usize>();
        problems.extend(check_page(page, &text));
    }
    assert!(links > 50, "only {links} links found: the link parser is broken");
    assert!(problems.is_empty(), "broken links:\n{}", problems.join("\n"));
}

#[test]
fn the_front_page_stays_short() {
    let lines = read(&root().join("README.md")).lines().count();
    assert!(
        lines <= FRONT_PAGE_MAX_LINES,
        "README.md has {lines} lines, more than {FRONT_PAGE_MAX_LINES}: move the detail to a page in docs/"
    );
}

#[test]
fn every_docs_page_is_in_the_index() {
    let index_path = root().join("docs/README.md");
    let index = read(&index_path);
    let listed: HashSet<String> = prose_lines(&index)
        .iter()
        .flat_map(|(_, l)| link_destinations(l))
        .map(|d| d.split('#').next().unwrap_or("").to_string())
        .collect();
    let missing: Vec<String> = docs_pages()
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|name| name != "README.md" && !listed.contains(name))
        .collect();
    assert!(missing.is_empty(), "docs/README.md does not link to {missing:?}");
}

#[test]
fn every_page_with_rust_examples_is_compiled_as_doctests() {
    let lib = read(&root().join("src/lib.rs"));
    let mut with_rust = vec![root().join("README.md")];
    with_rust.extend(docs_pages());
    for page in with_rust {
        let text = read(&page);
        if !text.lines().any(|l| l.trim_start().starts_with("```rust")) {
            continue;
        }
        let include = format!("include_str!(\"../{}\")", relative(&page));
        assert!(
            lib.contains(&include),
            "{} has Rust examples but src/lib.rs has no `#[doc = {include}]`",
            relative(&page)
        );
    }
}

// The checker checks itself on pages it must judge broken or whole.

#[test]
fn slugs_follow_github() {
    assert_eq!(slug("Memory under hostile peers"), "memory-under-hostile-peers");
    assert_eq!(
        slug("Several loops: `--threads N|auto`"),
        "several-loops---threads-nauto"
    );
    assert_eq!(
        slug("Compression (permessage-deflate)"),
        "compression-permessage-deflate"
    );
    assert_eq!(slug("`wsloop serve --processes N`"), "wsloop-serve---processes-n");
    assert_eq!(
        slug("What is supported, and what is not"),
        "what-is-supported-and-what-is-not"
    );
    assert_eq!(slug("Firmware (`no_std`)"), "firmware-no_std");
    assert_eq!(slug("See [the index](docs/README.md) ×2"), "see-the-index-2");
    let a = anchors("# Title\n\n## Figures\n\n```sh\n# not a heading\n```\n\n## Figures\n### Closed ##\n");
    let want: HashSet<String> = ["title", "figures", "figures-1", "closed"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(a, want);
}

#[test]
fn links_are_found_outside_code_only() {
    let text = "See [a](a.md) and `[b](b.md)` and ![c](img/c.png \"title\").\n\
                ```md\n[d](d.md)\n```\n\
                [e]: e.md\n\
                <https://example.com> [f](https://example.com/x_(y)) [g](#here) [h](x.md#a(b))\n";
    let found: Vec<String> = prose_lines(text)
        .iter()
        .flat_map(|(_, l)| link_destinations(l))
        .collect();
    assert_eq!(
        found,
        [
            "a.md",
            "img/c.png",
            "e.md",
            "https://example.com/x_(y)",
            "#here",
            "x.md#a(b)"
        ]
    );
    assert!(is_external("https://example.com/x"));
    assert!(is_external("mailto:someone@example.com"));
    assert!(!is_external("docs/cli.md#wsloop-serve"));
    assert!(!is_external("#a:b"));
}

#[test]
fn a_broken_link_or_anchor_is_reported() {
    let page = root().join("docs/README.md");
    let text = "# wsloop documentation\n\
                [ok](cli.md#wsloop-serve) [gone](no-such-page.md) [bad anchor](cli.md#no-such-heading)\n\
                [self](#wsloop-documentation) [self, wrong](#nowhere) [up](../README.md#install) [out](../../x)\n";
    let problems = check_page(&page, text);
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert!(
        problems[0].contains("no-such-page.md") && problems[0].contains("does not exist"),
        "{problems:#?}"
    );
    assert!(problems[1].contains("#no-such-heading"), "{problems:#?}");
    assert!(problems[2].contains("#nowhere"), "{problems:#?}");
    assert!(problems[3].contains("../../x"), "{problems:#?}");
}
