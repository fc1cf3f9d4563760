"""(completion, gold, expected verdict) in the formats real math answers come in.

Each expected verdict is asserted to equal math-verify's own (called directly, with its default
time limits) and the service's (tests/verifier/test_scoring.py, test_service.py).
"""

CASES: list[tuple[str, str, str]] = [
    # integers
    (r"The answer is $\boxed{42}$.", "42", "positive"),
    (r"So we get \boxed{41}.", "42", "negative"),
    (r"Hence \boxed{-7}.", "-7", "positive"),
    (r"Hence \boxed{7}.", "-7", "negative"),
    (r"Thus \boxed{ 7 }.", "7", "positive"),
    (r"Total: \boxed{1000}", "1000", "positive"),
    # fractions and \frac
    (r"\boxed{\frac{1}{2}}", r"\frac12", "positive"),
    (r"\boxed{1/2}", r"\frac{1}{2}", "positive"),
    (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", "positive"),
    (r"\boxed{\dfrac{3}{4}}", "0.75", "positive"),
    (r"\boxed{\frac{3}{5}}", r"\frac{3}{4}", "negative"),
    (r"\boxed{-\frac{\pi}{6}}", r"-\frac{\pi}{6}", "positive"),
    # decimals vs fractions
    (r"\boxed{0.5}", r"\frac{1}{2}", "positive"),
    (r"\boxed{0.33}", r"\frac{1}{3}", "negative"),
    (r"\boxed{1.5 \times 10^{3}}", "1500", "positive"),
    # square roots
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", "positive"),
    (r"\boxed{\sqrt{2}}", r"\sqrt{3}", "negative"),
    (r"\boxed{\frac{\sqrt{3}}{3}}", r"\frac{1}{\sqrt{3}}", "positive"),
    (r"\boxed{11\sqrt{2}}", r"11\sqrt2", "positive"),
    # pi
    (r"\boxed{\pi}", r"\pi", "positive"),
    (r"\boxed{3.14}", r"\pi", "negative"),
    (r"\boxed{\pi/2}", r"\frac{\pi}{2}", "positive"),
    # percentages
    (r"\boxed{50\%}", "50", "positive"),
    (r"\boxed{40\%}", "50", "negative"),
    # degrees
    (r"\boxed{90^\circ}", r"90^\circ", "positive"),
    (r"\boxed{90}", r"90^\circ", "positive"),
    (r"\boxed{45^\circ}", r"90^\circ", "negative"),
    # intervals
    (r"\boxed{(-\infty, 3]}", r"(-\infty, 3]", "positive"),
    (r"\boxed{(-\infty, 3)}", r"(-\infty, 3]", "negative"),
    (r"\boxed{[2,5)}", r"[2,5)", "positive"),
    # sets
    (r"\boxed{\{1, 2, 3\}}", r"\{3,2,1\}", "positive"),
    (r"\boxed{-2, 1}", "1,-2", "positive"),
    (r"\boxed{1, 2}", "1,-2", "negative"),
    # tuples
    (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", "positive"),
    (r"\boxed{(\frac{\pi}{2}, 3)}", r"\left( 3, \frac{\pi}{2} \right)", "negative"),
    # equations
    (r"\boxed{x=5}", "x=5", "positive"),
    (r"\boxed{x=4}", "x=5", "negative"),
    (r"\boxed{y = 2x + 3}", "y=2x+3", "positive"),
    # expressions, complex numbers, text answers, bases, matrices, units
    (r"\boxed{x^2+2x+1}", "(x+1)^2", "positive"),
    (r"\boxed{6-5i}", "6 - 5i", "positive"),
    (r"\boxed{6+5i}", "6 - 5i", "negative"),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", "positive"),
    (r"\boxed{\text{Bob}}", r"\text{Evelyn}", "negative"),
    (r"\boxed{52_8}", "52_8", "positive"),
    (
        r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}",
        r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}",
        "positive",
    ),
    (r"\boxed{5 \text{ cm}}", "5", "positive"),
    (r"\boxed{1 \pm \sqrt{19}}", r"1 \pm \sqrt{19}", "positive"),
    # text around the box
    (
        "First, 2 + 2 = 4. Then 4 \\cdot 3 = 12, and we double-check 12 / 3 = 4.\n"
        r"So the answer is $\boxed{12}$, as required.",
        "12",
        "positive",
    ),
    (
        "Suppose the answer were 12. Then 2 + 2 = 5, a contradiction.\n"
        r"So the answer is $\boxed{13}$.",
        "12",
        "negative",
    ),
    # several boxes: math-verify reads all of them as one set, so hedging is never rewarded
    (r"First guess \boxed{3}. Wait, rechecking: \boxed{5}.", "5", "negative"),
    (r"First guess \boxed{5}. Wait, rechecking: \boxed{3}.", "5", "negative"),
    (r"We get \boxed{5}. Checking again, indeed \boxed{5}.", "5", "positive"),
    (r"The roots are \boxed{3} and \boxed{5}.", "3, 5", "positive"),
    # no box: the "final answer is" anchor, a bare trailing answer, nothing at all
    (r"The final answer is $\frac{1}{2}$.", r"\frac{1}{2}", "positive"),
    ("I could not finish this problem.", "42", "negative"),
    (r"Empty box: \boxed{}", "3", "negative"),
]
