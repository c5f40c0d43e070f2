//! The math verifier: known false positives of Math-Verify stay false,
//! notations, strict vs lenient extraction, and properties (equal rationals
//! in different notations verify, different ones do not, arbitrary input
//! never panics and finishes quickly).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use aha_rewards::math::{answers_equivalent, extract_answer, verify, Extraction, MathConfig, MathReward};
use aha_rewards::{Example, Reward, Status};
use proptest::prelude::*;

fn strict() -> MathConfig {
    MathConfig::default()
}

fn lenient() -> MathConfig {
    MathConfig {
        extraction: Extraction::Any,
        ..MathConfig::default()
    }
}

fn boxed(s: &str) -> String {
    format!("Thinking... so the answer is \\boxed{{{s}}}.")
}

fn check(gold: &str, pred: &str) -> Status {
    verify(gold, &boxed(pred), &strict()).status
}

#[test]
fn reported_false_positives_are_false() {
    // Two different equations that both reduce to "= 0".
    assert_eq!(check("x + y = 0", "x - y = 0"), Status::Wrong);
    assert_eq!(check("a + 3z = 0", "0"), Status::Wrong);
    assert_eq!(check("x^2 - 1 = 0", "x^2 + 1 = 0"), Status::Wrong);
    // Tiny numbers that floats would round to the same value.
    assert_eq!(check("\\frac{1}{2004!}", "\\frac{1}{2006!}"), Status::Wrong);
    assert_eq!(check("1/2004!", "1/2004!"), Status::Correct);
    assert_eq!(check("10^{-400}", "10^{-401}"), Status::Wrong);
    // \pm is two values.
    assert_eq!(check("2021", "\\pm 2021"), Status::Wrong);
    assert_eq!(check("\\pm 2021", "2021"), Status::Wrong);
    assert_eq!(check("\\pm 2", "\\{2, -2\\}"), Status::Correct);
    // Strict mode: no box, no reward, even if the right number appears.
    let out = verify("42", "We compute 6*7 = 42. Therefore the result is 42.", &strict());
    assert_eq!(out.status, Status::NoAnswer);
    assert_eq!(out.score, 0.0);
    let out = verify("42", "Steps: 40, 41, 42, 43. <answer>43</answer>", &strict());
    assert_eq!(out.status, Status::Wrong);
    // Hedges: several values, numbers side by side, chains.
    assert_eq!(check("6", "2 3"), Status::Wrong);
    assert_eq!(check("6", "6 \\text{ or } 7"), Status::Wrong);
    assert_eq!(check("6", "6, 7"), Status::Wrong);
    assert_eq!(check("6", "x = 6 \\text{ or } x = 7"), Status::Wrong);
    assert_eq!(check("\\text{Evelyn}", "\\text{Evelyn or Bob}"), Status::Wrong);
    assert_eq!(check("5", "5 \\pm 1"), Status::Wrong);
}

#[test]
fn equations_scaled_or_rearranged_are_equal() {
    assert_eq!(check("2x + 4 = 0", "x + 2 = 0"), Status::Correct);
    // Two equations of one line, however written (as in Math-Verify).
    assert_eq!(check("y = 2x + 1", "2x - y + 1 = 0"), Status::Correct);
    assert_eq!(check("y = 2x + 1", "2x - y - 1 = 0"), Status::Wrong);
    assert_eq!(check("x - 2y + z - 1 = 0", "2x - 4y + 2z = 2"), Status::Correct);
    assert_eq!(check("x < 1", "-x > -1"), Status::Correct);
    assert_eq!(check("x < 1", "x > -1"), Status::Wrong);
    assert_eq!(check("x \\ge 5", "x >= 5"), Status::Correct);
    assert_eq!(check("x \\ge 5", "[5, \\infty)"), Status::Correct);
    assert_eq!(check("x \\ge 5", "(5, \\infty)"), Status::Wrong);
}

#[test]
fn notations() {
    let same = [
        ("\\frac{1}{2}", "0.5"),
        ("\\frac{1}{2}", "\\dfrac12"),
        ("\\frac{1}{2}", "1/2"),
        ("\\frac{3}{2}", "1\\frac{1}{2}"),
        ("50\\%", "50"),
        ("50\\%", "0.5"),
        ("1000", "1{,}000"),
        ("1234567", "1,234,567"),
        ("90^\\circ", "90"),
        ("5", "x = 5"),
        ("\\text{(C)}", "C"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("\\frac{\\sqrt{3}}{2}", "0.8660254"),
        ("\\pi", "3.14159265"),
        ("\\frac{9\\pi}{4}", "\\frac94\\pi"),
        ("(1, 2)", "\\left(1,2\\right)"),
        ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}"),
        ("[0, 1)", "[0,1)"),
        ("(-\\infty, 2] \\cup (3, \\infty)", "(3,\\infty) \\cup (-\\infty,2]"),
        (
            "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
            "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}",
        ),
        ("10_{2}", "2"),
        ("\\$16.50", "16.5"),
        ("12 \\text{ cm}", "12"),
        ("\\frac{x+2}{7}", "\\frac{x}{7} + \\frac{2}{7}"),
        ("\\sec^2 y", "\\tan^2 y + 1"),
        ("\\sqrt[3]{-8}", "-2"),
        ("6 - 5i", "-5i + 6"),
    ];
    for (g, p) in same {
        assert_eq!(check(g, p), Status::Correct, "{g} vs {p}");
    }
    let different = [
        ("\\frac{1}{3}", "0.3"),
        ("\\frac{1}{3}", "0.33"),
        ("16386.16", "16386.17"),
        ("(1, 2)", "(2, 1)"),
        ("(1, 2)", "[1, 2]"),
        ("(3,1)", "{1,3}"),
        (
            "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
            "\\begin{pmatrix} 1 & 2 \\\\ 3 & 5 \\end{pmatrix}",
        ),
        ("4", "4\\sqrt{2}"),
        ("\\sqrt{2}", "1.41"),
        ("x", "y"),
        ("f(x)", "f(y)"),
        ("1112112_3", "1112122_3"),
        ("2", "2, 3"),
    ];
    for (g, p) in different {
        assert_eq!(check(g, p), Status::Wrong, "{g} vs {p}");
    }
}

#[test]
fn statuses() {
    assert_eq!(verify("", &boxed("1"), &strict()).status, Status::UnparsableGold);
    let out = verify("\\frac{", &boxed("1"), &strict());
    assert_eq!(out.status, Status::UnparsableGold);
    assert!(out.score.is_nan(), "unparsable gold is excluded from the baseline");
    assert_eq!(verify("1", "no box here", &strict()).status, Status::NoAnswer);
    assert_eq!(verify("1", &boxed("1 +* 2"), &strict()).status, Status::Wrong);
    assert_eq!(verify("1", "\\boxed{1", &strict()).status, Status::NoAnswer);
    let reward = MathReward::default();
    let mut ex = Example::new();
    ex.insert("gold".into(), serde_json::json!(7));
    assert_eq!(reward.score(&ex, &boxed("7")).score, 1.0);
    assert_eq!(
        reward.score(&Example::new(), &boxed("7")).status,
        Status::UnparsableGold
    );
}

#[test]
fn extraction_modes() {
    let text = "first \\boxed{1}. Then \\boxed{\\frac{a}{b}}";
    let e = extract_answer(text, Extraction::Boxed).unwrap();
    assert_eq!(e.parts, vec!["\\frac{a}{b}".to_string()]);
    let e = extract_answer("<think>x</think><answer> 12 </answer>", Extraction::Boxed).unwrap();
    assert_eq!(e.parts, vec!["12".to_string()]);
    assert!(extract_answer("The answer is 12.", Extraction::Boxed).is_none());
    let e = extract_answer("<answer>The answer is $x = 12$.</answer>", Extraction::Boxed).unwrap();
    assert_eq!(e.parts, vec!["x = 12".to_string()]);
    assert!(extract_answer("<answer> </answer>", Extraction::Boxed).is_none());
    let e = extract_answer("The final answer is 12. I hope it is correct.", Extraction::Any).unwrap();
    assert_eq!(e.parts, vec!["12".to_string()]);
    let e = extract_answer("\\boxed{1} and \\boxed{2}", Extraction::Boxed).unwrap();
    assert_eq!(e.parts.len(), 2);
    // GSM8K's reference format.
    assert_eq!(
        verify("He pays 3*4 = 12.\n#### 12", &boxed("12"), &strict()).status,
        Status::Correct
    );
    assert_eq!(
        verify("Answer: $x = 4$", "so $x=4$", &lenient()).status,
        Status::Correct
    );
}

#[test]
fn real_references_parse_and_verify() {
    // Reference answers of MATH-500, AIME 2024, AMC 2023 and GSM8K (the
    // last line of the worked solution, `#### N`).
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/rewards/reference_answers.jsonl"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let (mut parsed, mut self_equal, mut n) = (0, 0, 0);
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let gold = v["gold"].as_str().unwrap();
        let answer = match gold.rfind("####") {
            Some(p) => gold[p + 4..].trim().to_string(),
            None => gold.to_string(),
        };
        n += 1;
        assert_eq!(
            verify(gold, &boxed(&answer), &strict()).status,
            Status::Correct,
            "{gold}"
        );
        if aha_rewards::math::parse_answer(&answer).is_some() {
            parsed += 1;
        } else {
            println!("does not parse: {answer:?}");
        }
        // Without the string shortcut: the parsed answer equals itself.
        if answers_equivalent(&answer, &answer) {
            self_equal += 1;
        }
        if let Ok(k) = answer.parse::<i64>() {
            let wrong = boxed(&(k + 1).to_string());
            assert_eq!(verify(gold, &wrong, &strict()).status, Status::Wrong, "{gold}");
        }
    }
    println!("{parsed}/{n} reference answers parse, {self_equal}/{n} equal themselves");
    assert!(parsed as f64 >= 0.97 * n as f64);
    assert!(self_equal as f64 >= 0.97 * n as f64);
}

fn notations_of(p: i64, q: i64) -> Vec<String> {
    let mut v = vec![
        format!("\\frac{{{p}}}{{{q}}}"),
        format!("{p}/{q}"),
        format!("\\dfrac{{{}}}{{{}}}", 2 * p, 2 * q),
    ];
    if p % q == 0 {
        v.push(format!("{}", p / q));
    }
    // Terminating decimals when q has only factors 2 and 5.
    let mut d = q;
    while d % 2 == 0 {
        d /= 2;
    }
    while d % 5 == 0 {
        d /= 5;
    }
    if d == 1 {
        let x = p as f64 / q as f64;
        v.push(format!("{x}"));
    }
    if p < 0 {
        v.push(format!("-\\frac{{{}}}{{{q}}}", -p));
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn equal_rationals_in_different_notations_verify(p in -500i64..500, q in 1i64..64, i in 0usize..8, j in 0usize..8) {
        let forms = notations_of(p, q);
        let a = &forms[i % forms.len()];
        let b = &forms[j % forms.len()];
        prop_assert!(answers_equivalent(a, b), "{} vs {}", a, b);
        prop_assert_eq!(check(a, b), Status::Correct);
    }

    #[test]
    fn different_rationals_do_not_verify(p in -500i64..500, q in 1i64..64, r in -500i64..500, s in 1i64..64, i in 0usize..8, j in 0usize..8) {
        prop_assume!(p * s != r * q);
        let a = &notations_of(p, q)[i % notations_of(p, q).len()];
        let b = &notations_of(r, s)[j % notations_of(r, s).len()];
        prop_assert!(!answers_equivalent(a, b), "{} vs {}", a, b);
    }

    #[test]
    fn arbitrary_strings_never_panic_and_finish_quickly(gold in ".{0,200}", pred in ".{0,400}") {
        let t = Instant::now();
        let _ = verify(&gold, &pred, &strict());
        let _ = verify(&gold, &pred, &lenient());
        let _ = verify(&gold, &boxed(&pred), &lenient());
        prop_assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn number_like_text_never_panics(s in "[0-9,. %a-z$\\\\-]{0,80}") {
        let _ = extract_answer(&s, Extraction::Any);
        let _ = verify(&s, &s, &lenient());
    }

    #[test]
    fn latex_like_strings_never_panic(s in "[0-9a-z\\\\{}()\\[\\]^_+*/=<>,.!|&$ -]{0,120}") {
        let t = Instant::now();
        let _ = verify(&s, &boxed(&s), &lenient());
        let _ = verify("1", &format!("\\boxed{{{s}}}"), &strict());
        prop_assert!(t.elapsed() < Duration::from_secs(2));
    }
}

#[test]
fn hostile_inputs_are_bounded() {
    let deep = format!("\\boxed{{{}1{}}}", "{".repeat(5000), "}".repeat(5000));
    let t = Instant::now();
    assert_ne!(verify("1", &deep, &strict()).status, Status::Correct);
    let big = format!("\\boxed{{{}}}", "9".repeat(100_000));
    assert_ne!(verify("1", &big, &strict()).status, Status::Correct);
    let pow = "\\boxed{10^{10^{10^{10}}}}";
    assert_eq!(verify("1", pow, &strict()).status, Status::Wrong);
    assert_eq!(
        verify("10^{10^{10^{10}}}", "\\boxed{10^{10^{10^{10}}}+1}", &strict()).status,
        Status::Wrong
    );
    let fact = "\\boxed{(10^{9})!}";
    assert_eq!(verify("1", fact, &strict()).status, Status::Wrong);
    let long = "x".repeat(5_000_000) + "\\boxed{3}";
    assert_eq!(verify("3", &long, &strict()).status, Status::Correct);
    let parens = "(".repeat(100_000);
    let _ = verify(&parens, &parens, &lenient());
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
}

fn any(gold: &str, completion: &str) -> Status {
    verify(gold, completion, &lenient()).status
}

#[test]
fn prose_answers_follow_math_verify_priorities() {
    // An anchored answer beats later numbers; the first value after "answer".
    assert_eq!(
        any("$6$", "The answer is 6; checking, 2 + 3 = 5 and 5 + 2 = 7."),
        Status::Wrong
    );
    assert_eq!(any("$6$", "The answer is 6, not 7 as first thought."), Status::Correct);
    assert_eq!(any("$13$", "Answer: 13 marbles"), Status::Correct);
    assert_eq!(any("$13$", "Answer: 14 marbles"), Status::Wrong);
    // After "answer", the value after the last `=` on the line.
    assert_eq!(any("$9$", "So the answer: a = 4, hence b = 9."), Status::Correct);
    // Without an anchor, the last number, math span or plain fraction.
    assert_eq!(
        any("$\\frac{5}{8}$", "Dividing, we get p = \\frac{5}{8}."),
        Status::Correct
    );
    assert_eq!(
        any("$\\frac{1}{3}$", "Each of $\\frac{1}{3}$ of the 3 boxes"),
        Status::Wrong
    );
    assert_eq!(any("$17$", "Thus $a = 4$ and therefore $b = 17$."), Status::Correct);
    assert_eq!(
        any("$\\frac{1}{9}$", "The final answer is $\\frac{1}{9}$ since 9 = 3^2."),
        Status::Correct
    );
}

#[test]
fn matrix_expressions_are_evaluated() {
    let m = |rows: &[&[&str]]| {
        let body: Vec<String> = rows.iter().map(|r| r.join(" & ")).collect();
        format!("\\begin{{pmatrix}} {} \\end{{pmatrix}}", body.join(" \\\\ "))
    };
    let a = m(&[&["2", "0"], &["1", "3"]]);
    let b = m(&[&["1", "1"], &["0", "1"]]);
    assert_eq!(
        check(&m(&[&["3", "1"], &["1", "4"]]), &format!("{a} + {b}")),
        Status::Correct
    );
    assert_eq!(
        check(&m(&[&["1", "-1"], &["1", "2"]]), &format!("{a} - {b}")),
        Status::Correct
    );
    assert_eq!(
        check(&m(&[&["2", "2"], &["1", "4"]]), &format!("{a}{b}")),
        Status::Correct
    );
    assert_eq!(
        check(&m(&[&["3", "1"], &["1", "3"]]), &format!("{a}{b}")),
        Status::Wrong
    );
    assert_eq!(
        check(&m(&[&["6", "0"], &["3", "9"]]), &format!("3{a}")),
        Status::Correct
    );
    assert_eq!(
        check(&m(&[&["1", "0"], &["0.5", "1.5"]]), &format!("\\frac{{1}}{{2}}{a}")),
        Status::Correct
    );
    // Decimals against fractions entry by entry; shapes matter.
    assert_eq!(
        check(
            &m(&[&["\\frac{1}{4}"], &["\\frac{2}{3}"]]),
            &m(&[&["0.25"], &["0.666667"]])
        ),
        Status::Correct
    );
    assert_eq!(
        check(&m(&[&["\\frac{1}{4}"], &["\\frac{2}{3}"]]), &m(&[&["0.25"], &["0.6"]])),
        Status::Wrong
    );
    assert_eq!(check(&m(&[&["1", "2"]]), &m(&[&["1"], &["2"]])), Status::Wrong);
    // A product of incompatible shapes is not an answer.
    assert_eq!(
        check(
            &m(&[&["1"]]),
            &format!("{}{}", m(&[&["1"], &["2"]]), m(&[&["1"], &["2"]]))
        ),
        Status::Wrong
    );
}

#[test]
fn equations_and_relations_follow_math_verify_directions() {
    assert_eq!(check("4x + 2y = 10", "y = 5 - 2x"), Status::Correct);
    assert_eq!(check("y = 5 - 2x", "4x + 2y = 10"), Status::Correct);
    assert_eq!(check("4x + 2y = 10", "y = 5 + 2x"), Status::Wrong);
    // A value asked, an equation given: its right side counts.
    assert_eq!(check("7", "PQ = 7"), Status::Correct);
    assert_eq!(check("7", "3x = 7"), Status::Correct);
    assert_eq!(check("PQ = 7", "7"), Status::Correct);
    assert_eq!(check("2x + y = 7", "7"), Status::Wrong);
    assert_eq!(check("a = 7", "b = 7"), Status::Wrong);
    // A gold inequality accepts its interval; an interval gold does not accept a relation.
    assert_eq!(check("-3 \\le s < 2", "[-3, 2)"), Status::Correct);
    assert_eq!(check("-3 \\le s < 2", "(-3, 2)"), Status::Wrong);
    assert_eq!(check("[-3, 2)", "-3 \\le s < 2"), Status::Wrong);
    // Relations joined by "or" are two answers, not a set (as in Math-Verify);
    // unions compare as sets.
    assert_eq!(
        check("s \\le -1 \\text{ or } s > 4", "(-\\infty, -1] \\cup (4, \\infty)"),
        Status::Wrong
    );
    assert_eq!(
        check("(-\\infty, -1] \\cup (4, \\infty)", "(4, \\infty) \\cup (-\\infty, -1]"),
        Status::Correct
    );
}

#[test]
fn sets_and_several_answers() {
    assert_eq!(
        check("\\{(2,2,5), (2,5,2), (5,2,2)\\}", "(5,2,2), (2,2,5), (2,5,2)"),
        Status::Correct
    );
    assert_eq!(
        check("\\{(2,2,5), (2,5,2), (5,2,2)\\}", "(5,2,2), (2,2,5)"),
        Status::Wrong
    );
    // Repeats count once in a set.
    assert_eq!(check("4, 4, 9", "9, 4"), Status::Correct);
    assert_eq!(check("4, 9", "4, 9, 10"), Status::Wrong);
    assert_eq!(
        any("$-1, 6$", "So the roots are $\\boxed{6}$ and $\\boxed{-1}$."),
        Status::Correct
    );
    // Boxes in separate sentences are not one answer: the last one counts.
    assert_eq!(
        any("$3, 8$", "(a) We find $\\boxed{3}$.\n(b) We find $\\boxed{8}$."),
        Status::Wrong
    );
    assert_eq!(
        any("$8$", "(a) We find $\\boxed{3}$.\n(b) We find $\\boxed{8}$."),
        Status::Correct
    );
    assert_eq!(check("(4, -2)", "(-2, 4)"), Status::Wrong);
}

#[test]
fn numbers_as_people_write_them() {
    assert_eq!(any("$2345678$", "In total 2,345,678 people."), Status::Correct);
    assert_eq!(check("23456", "23, 456"), Status::Wrong);
    assert_eq!(check("23456", "23{,}456"), Status::Correct);
    assert_eq!(check("2345", "2,\\! 345"), Status::Correct);
    assert_eq!(any("$35\\%$", "It grows by 35 percent."), Status::Correct);
    assert_eq!(check("0.35", "35\\%"), Status::Correct);
    assert_eq!(check("72", "72^\\circ"), Status::Correct);
    assert_eq!(check("8", "8 \\text{ meters}"), Status::Correct);
    assert_eq!(check("8", "9 \\text{ meters}"), Status::Wrong);
}

#[test]
fn answers_broken_across_delimiters_are_not_joined() {
    // Inline math does not span lines; the number after it is the answer.
    assert_eq!(any("$10$", "So the total is $5 +\n 5$"), Status::Wrong);
    // Math spans joined by prose are separate answers: the last one counts.
    assert_eq!(any("$4$", "We have $x = 2$ so that $y = 4$."), Status::Correct);
    // An empty box is skipped.
    assert_eq!(any("$3$", "\\boxed{} so maybe 3"), Status::Correct);
}
