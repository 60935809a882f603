// One's own account: change the password, set up the TOTP second factor (the server asks the password first).
import { me, post } from "/ui/api.js";
import { extend, switchLang, t, translate } from "/ui/i18n.js";

extend({
  ja: {
    "account.title": "アカウント",
    "account.back": "戻る",
    "account.password": "パスワードの変更",
    "account.current": "今のパスワード",
    "account.new": "新しいパスワード（10文字以上）",
    "account.again": "新しいパスワード（もう一度）",
    "account.change": "変更する",
    "account.mismatch": "新しいパスワードが一致しません",
    "account.changed": "パスワードを変更しました。ほかの端末のサインインは終了しました（{n} 件）",
    "account.totp": "確認コード（2段階認証）",
    "account.totp_on": "設定済みです。端末をなくしたときは管理者に解除を依頼してください。",
    "account.totp_off": "未設定です。サインインのときにパスワードと確認コードの両方が必要になります。",
    "account.totp_start": "設定を始める",
    "account.totp_key": "認証アプリに次のキーを登録してください（時間ベース、6桁）:",
    "account.totp_uri": "または次の URI:",
    "account.totp_code": "アプリに表示された6桁のコード",
    "account.totp_confirm": "有効にする",
    "account.totp_done": "確認コードを有効にしました。次回からサインインにコードが必要です。",
    "account.failed": "できませんでした",
  },
  en: {
    "account.title": "Account",
    "account.back": "Back",
    "account.password": "Change password",
    "account.current": "Current password",
    "account.new": "New password (10 characters or more)",
    "account.again": "New password (again)",
    "account.change": "Change",
    "account.mismatch": "the new passwords differ",
    "account.changed": "Password changed. Your sign-ins on other devices ended ({n}).",
    "account.totp": "Code (two-step sign-in)",
    "account.totp_on": "On. If you lose the device, ask an administrator to turn it off.",
    "account.totp_off": "Off. Once on, signing in needs the password and a code.",
    "account.totp_start": "Set up",
    "account.totp_key": "Add this key to your authenticator app (time-based, 6 digits):",
    "account.totp_uri": "or this URI:",
    "account.totp_code": "The 6-digit code the app shows",
    "account.totp_confirm": "Turn on",
    "account.totp_done": "The code is on: signing in needs it from now on.",
    "account.failed": "Could not do it",
  },
});

const $ = (id) => document.getElementById(id);

function say(el, text, bad) {
  el.textContent = text;
  el.className = bad ? "error" : "ok";
}

async function main() {
  translate();
  $("lang").onclick = switchLang;
  const who = await me();
  if (!who) {
    location.href = "/ui/";
    return;
  }
  $("who").textContent = who.name;
  if (!who.permissions.includes("read") && !who.permissions.includes("vm.read")) $("back").href = "/ui/portal.html";
  const form = $("password-form");
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    if ($("new1").value !== $("new2").value) return say($("password-result"), t("account.mismatch"), true);
    try {
      const r = await post("/v1/auth/me/password", { current_password: $("current").value, password: $("new1").value });
      form.reset();
      say($("password-result"), t("account.changed", { n: r.sessions_ended }), false);
    } catch (e) {
      say($("password-result"), `${t("account.failed")}: ${e.message}`, true);
    }
  };
  $("totp-state").textContent = t(who.totp ? "account.totp_on" : "account.totp_off");
  $("totp-start").hidden = Boolean(who.totp);
  $("totp-start").onsubmit = async (ev) => {
    ev.preventDefault();
    try {
      const e = await post("/v1/auth/me/totp", { password: $("totp-password").value });
      $("totp-secret").textContent = e.secret.replace(/(.{4})/g, "$1 ").trim();
      $("totp-uri").textContent = e.uri;
      $("totp-start").hidden = true;
      $("totp-confirm").hidden = false;
      $("totp-code").focus();
      say($("totp-result"), "", false);
    } catch (e) {
      say($("totp-result"), `${t("account.failed")}: ${e.message}`, true);
    }
  };
  $("totp-confirm").onsubmit = async (ev) => {
    ev.preventDefault();
    try {
      await post("/v1/auth/me/totp/confirm", { totp: $("totp-code").value.replace(/\s/g, "") });
      $("totp-confirm").hidden = true;
      $("totp-secret").textContent = "";
      $("totp-uri").textContent = "";
      $("totp-state").textContent = t("account.totp_on");
      say($("totp-result"), t("account.totp_done"), false);
    } catch (e) {
      say($("totp-result"), `${t("account.failed")}: ${e.message}`, true);
    }
  };
}

main();
