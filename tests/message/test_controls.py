"""relay/message/controls.py as a plain table: the X-KW-* control headers an app sets, read
from a message's header section; a bad value or an unknown header is a problem, never an
exception."""

from __future__ import annotations

import pytest

from relay.message.controls import Controls, read_controls


def headers(*lines: str, body: str = "Body\r\n") -> bytes:
    return ("".join(line + "\r\n" for line in ("From: a@kw.test", *lines)) + "\r\n"
            + body).encode()


@pytest.mark.parametrize(("content", "expected"), [
    pytest.param(headers("X-KW-App: campaigns", "X-KW-SmartPlan-Id: sp-1", "X-KW-SmartPlan-Step: 3",
                         "X-KW-Contact-Id: c:42", "X-KW-Campaign-Id: cmp.7_A",
                         "X-KW-Route: mailchimp"),
                 Controls(app="campaigns", smartplan_id="sp-1", smartplan_step=3,
                          contact_id="c:42", campaign_id="cmp.7_A", route="mailchimp"),
                 id="all-valid"),
    pytest.param(headers("x-kw-smartplan-id:sp-9", "X-KW-SMARTPLAN-STEP:   12  "),
                 Controls(smartplan_id="sp-9", smartplan_step=12), id="names-any-case"),
    pytest.param(headers("X-KW-Route: MailChimp"), Controls(route="mailchimp"),
                 id="route-lower-cased"),
    pytest.param(headers(), Controls(), id="none"),
    pytest.param(headers("Subject: hi", body="X-KW-Route: mailchimp\r\n"), Controls(),
                 id="body-is-not-a-header"),
    pytest.param(headers("X-KW-SmartPlan-Step: abc", "X-KW-Contact-Id: c-1"),
                 Controls(contact_id="c-1", problems=("invalid X-KW-smartplan-step",)),
                 id="bad-step"),
    pytest.param(headers("X-KW-SmartPlan-Step: -1"),
                 Controls(problems=("invalid X-KW-smartplan-step",)), id="negative-step"),
    pytest.param(headers("X-KW-SmartPlan-Step: 1234567"),
                 Controls(problems=("invalid X-KW-smartplan-step",)), id="step-too-long"),
    pytest.param(headers("X-KW-SmartPlan-Step: \u00b2"),
                 Controls(problems=("invalid X-KW-smartplan-step",)), id="step-superscript"),
    pytest.param(headers("X-KW-SmartPlan-Step: \u0663"),
                 Controls(problems=("invalid X-KW-smartplan-step",)), id="step-non-ascii-digit"),
    pytest.param(headers("X-KW-Contact-Id: c 42"),
                 Controls(problems=("invalid X-KW-contact-id",)), id="id-with-space"),
    pytest.param(headers("X-KW-SmartPlan-Id: sp/1"),
                 Controls(problems=("invalid X-KW-smartplan-id",)), id="id-with-slash"),
    pytest.param(headers("X-KW-Campaign-Id: -c1"),
                 Controls(problems=("invalid X-KW-campaign-id",)), id="id-leading-dash"),
    pytest.param(headers("X-KW-Campaign-Id: " + "c" * 129),
                 Controls(problems=("invalid X-KW-campaign-id",)), id="id-too-long"),
    pytest.param(headers("X-KW-Campaign-Id: " + "c" * 128), Controls(campaign_id="c" * 128),
                 id="id-longest"),
    pytest.param(headers("X-KW-Contact-Id: caf\u00e9"),
                 Controls(problems=("invalid X-KW-contact-id",)), id="id-non-ascii"),
    pytest.param(headers("X-KW-Route: mail chimp"),
                 Controls(problems=("invalid X-KW-route",)), id="route-with-space"),
    pytest.param(headers("X-KW-Priority: high", "X-KW-Route: command"),
                 Controls(route="command", problems=("unknown header X-KW-priority",)),
                 id="unknown-header"),
    pytest.param(headers("X-KW-Route:", " mailchimp"), Controls(route="mailchimp"),
                 id="folded-after-empty-first-line"),
    pytest.param(headers("X-KW-Contact-Id: c-1", "\tc-2"),
                 Controls(problems=("invalid X-KW-contact-id",)), id="folded-into-two-words"),
    pytest.param(headers("X-KW-SmartPlan-Id: sp-1", "X-KW-SmartPlan-Id: sp-2"),
                 Controls(smartplan_id="sp-1"), id="first-of-repeated-wins"),
    pytest.param(headers("X-KW-Route:\tmailchimp\t"), Controls(route="mailchimp"),
                 id="tabs-around-value-are-blanks"),
    # A C0 control character or DEL anywhere in a value makes it invalid, never cleaned into
    # a valid value: a VT or FF at either end used to be stripped like a blank, so
    # "X-KW-Route: <VT>mailchimp" chose the mailchimp route.
    pytest.param(headers("X-KW-Route: \x0bmailchimp"),
                 Controls(problems=("invalid X-KW-route",)), id="route-leading-vt"),
    pytest.param(headers("X-KW-Route: mailchimp\x0c"),
                 Controls(problems=("invalid X-KW-route",)), id="route-trailing-ff"),
    pytest.param(headers("X-KW-Route:\x0b\x0ccommand\x0b"),
                 Controls(problems=("invalid X-KW-route",)), id="route-vt-ff-around"),
    pytest.param(headers("X-KW-Route:", " \x0bmailchimp"),
                 Controls(problems=("invalid X-KW-route",)), id="route-folded-leading-vt"),
    pytest.param(headers("X-KW-Route: \x7fmailchimp"),
                 Controls(problems=("invalid X-KW-route",)), id="route-leading-del"),
    pytest.param(headers("X-KW-Route: mailchimp\x1f"),
                 Controls(problems=("invalid X-KW-route",)), id="route-trailing-us"),
    pytest.param(headers("X-KW-Route: mail\tchimp"),
                 Controls(problems=("invalid X-KW-route",)), id="route-inner-tab"),
    pytest.param(headers("X-KW-Contact-Id: \x0bc-1", "X-KW-SmartPlan-Step: 3\x0c",
                         "X-KW-Campaign-Id: \x00cmp-1"),
                 Controls(problems=("invalid X-KW-contact-id", "invalid X-KW-smartplan-step",
                                    "invalid X-KW-campaign-id")),
                 id="ids-with-control-at-an-end"),
    pytest.param(headers("X-KW-Route\x0b: mailchimp"),
                 Controls(problems=("unknown header X-KW-route\x0b",)), id="name-trailing-vt"),
    # Only A-Z are lower-cased: KELVIN SIGN (U+212A) is no "k".
    pytest.param(headers("X-KW-Route: mailchimp\u212a"),
                 Controls(problems=("invalid X-KW-route",)), id="route-kelvin-sign"),
])
def test_read_controls_table(content: bytes, expected: Controls) -> None:
    """Valid control values are typed; a bad value or unknown X-KW header is a problem, never
    an exception."""
    assert read_controls(content) == expected


def test_controls_ids_only_present_ones() -> None:
    """ids() gives the tracking ids present, for events and logs."""
    controls = read_controls(headers("X-KW-SmartPlan-Id: sp-1", "X-KW-SmartPlan-Step: 0",
                                     "X-KW-Route: mailchimp"))
    assert controls.ids() == {"smartplan_id": "sp-1", "smartplan_step": 0}
