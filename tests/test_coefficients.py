"""deepnorm_coefficients against the paper's formulas, computed independently here."""

import math

import pytest

from deepnet_fairseq import deepnorm_coefficients


@pytest.mark.parametrize("n,m", [(6, 6), (18, 18), (100, 100), (500, 500), (12, 3)])
def test_encoder_decoder_constants(n, m):
    c = deepnorm_coefficients(n, m)
    assert c.encoder_alpha == pytest.approx(0.81 * math.pow(n**4 * m, 1 / 16), rel=1e-12)
    assert c.encoder_beta == pytest.approx(0.87 * math.pow(n**4 * m, -1 / 16), rel=1e-12)
    assert c.decoder_alpha == pytest.approx(math.pow(3 * m, 0.25), rel=1e-12)
    assert c.decoder_beta == pytest.approx(math.pow(12 * m, -0.25), rel=1e-12)


def test_paper_table_values_at_6_and_100_layers():
    # the values printed in ../shared/docs (computed from the paper's formulas) to 4 decimals
    c6, c100 = deepnorm_coefficients(6, 6), deepnorm_coefficients(100, 100)
    assert (round(c6.encoder_alpha, 4), round(c6.encoder_beta, 4)) == (1.4179, 0.4970)
    assert (round(c6.decoder_alpha, 4), round(c6.decoder_beta, 4)) == (2.0598, 0.3433)
    assert (round(c100.encoder_alpha, 4), round(c100.encoder_beta, 4)) == (3.4157, 0.2063)
    assert (round(c100.decoder_alpha, 4), round(c100.decoder_beta, 4)) == (4.1618, 0.1699)


@pytest.mark.parametrize("n", [1, 6, 18, 500])
def test_encoder_only(n):
    for c in (deepnorm_coefficients(n, None), deepnorm_coefficients(n, 0)):
        assert c.encoder_alpha == pytest.approx((2 * n) ** 0.25)
        assert c.encoder_beta == pytest.approx((8 * n) ** -0.25)
        assert c.decoder_alpha is None and c.decoder_beta is None


@pytest.mark.parametrize("m", [1, 12, 500])
def test_decoder_only(m):
    for c in (deepnorm_coefficients(None, m), deepnorm_coefficients(0, m)):
        assert c.decoder_alpha == pytest.approx((2 * m) ** 0.25)
        assert c.decoder_beta == pytest.approx((8 * m) ** -0.25)
        assert c.encoder_alpha is None and c.encoder_beta is None


def test_torchscale_encoder_constant():
    paper, code = deepnorm_coefficients(6, 6), deepnorm_coefficients(6, 6, encoder_beta_constant=1.15)
    assert code.encoder_beta == pytest.approx(1.15 * (6**5) ** (-1 / 16))
    assert round(code.encoder_beta, 4) == 0.6569
    assert code.encoder_alpha == paper.encoder_alpha and code.decoder_beta == paper.decoder_beta


@pytest.mark.parametrize(
    "n,m,name",
    [(-1, 6, "encoder_layers"), (6, -2, "decoder_layers"), (2.5, 6, "encoder_layers"), (6, "6", "decoder_layers"),
     (True, 6, "encoder_layers"), (0, 0, "encoder_layers and decoder_layers"), (None, None, "encoder_layers")],
)
def test_invalid_depths_name_the_argument(n, m, name):
    with pytest.raises(ValueError, match=name):
        deepnorm_coefficients(n, m)


def test_coefficients_cli_prints_table(capsys):
    from deepnet_fairseq.cli.coefficients import main

    assert main(["--layers", "6", "100"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 100 ")]
    cells = [float(c) for c in rows[0].strip("|").split("|")[1:]]
    assert cells[0] == pytest.approx(0.81 * (100**5) ** (1 / 16), abs=1e-4)
    assert cells[3] == pytest.approx((1200) ** -0.25, abs=1e-4)
    assert cells[5] == pytest.approx((800) ** -0.25, abs=1e-4)
    with pytest.raises(SystemExit):
        main(["--layers", "-3"])
