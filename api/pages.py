"""The user's own page: their API tokens (create, shown once; revoke)."""

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from api import services
from api.models import ApiToken
from kvmweb.access import get_scoped_or_404, scoped


class TokenForm(forms.Form):
    name = forms.CharField(label=gettext_lazy("Name"), max_length=100)
    expires_days = forms.IntegerField(
        label=gettext_lazy("Expires after (days, empty = never)"), required=False, min_value=1, max_value=3650
    )


@never_cache  # the answer to a creation holds the token text: no copy in any cache
@login_required
def token_list(request):
    form = TokenForm(request.POST or None)
    created = None
    if request.method == "POST" and form.is_valid():
        try:
            token, text = services.do_create_token(
                request.user,
                form.cleaned_data["name"],
                expires_days=form.cleaned_data["expires_days"],
                actor=request.user,
                request=request,
            )
        except services.TokenError as exc:
            form.add_error(None, str(exc))
        else:
            # Rendered, not redirected: the token text exists only in this response.
            created = {"token": token, "text": text}
            form = TokenForm()
    tokens = scoped(ApiToken, request.user)
    return render(request, "api/tokens.html", {"form": form, "tokens": tokens, "created": created})


@login_required
@require_POST
def token_revoke(request, pk):
    token = get_scoped_or_404(ApiToken, request.user, "change", pk=pk)
    if services.do_revoke_token(token, actor=request.user, request=request):
        messages.success(request, _("Token %(name)s revoked.") % {"name": token.name})
    else:
        messages.info(request, _("Token %(name)s was already revoked.") % {"name": token.name})
    return redirect("apitokens:list")
